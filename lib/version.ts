// The package version, for `--version` and /health. The standalone executable has no
// package.json beside it, so its bundle gets the version inlined at build time (esbuild
// `define`); a normal install reads package.json next to dist/.

import fs from 'node:fs';
import path from 'node:path';

declare const MIMICLAW_PACKAGE_VERSION: string | undefined;

let cached: string | undefined;

export function packageVersion(): string {
  if (cached !== undefined) return cached;
  if (typeof MIMICLAW_PACKAGE_VERSION === 'string') {
    cached = MIMICLAW_PACKAGE_VERSION;
  } else {
    // dist/lib/version.js -> ../../package.json
    const manifest = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version?: unknown };
    cached = typeof manifest.version === 'string' ? manifest.version : '0.0.0';
  }
  return cached;
}
