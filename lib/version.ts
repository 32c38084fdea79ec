// The package version, for --version and /health. A bundled executable has it inlined at build
// time (MIMICLAW_VERSION is replaced by esbuild's `define`); from dist/ it is read from
// package.json beside the package root.

import fs from 'node:fs';
import path from 'node:path';

declare const MIMICLAW_VERSION: string | undefined;

let cached: string | undefined;

export function packageVersion(): string {
  if (cached !== undefined) return cached;
  if (typeof MIMICLAW_VERSION === 'string') return (cached = MIMICLAW_VERSION);
  for (const candidate of [path.join(__dirname, '..', 'package.json'), path.join(__dirname, '..', '..', 'package.json')]) {
    try {
      const parsed = JSON.parse(fs.readFileSync(candidate, 'utf8')) as { name?: unknown; version?: unknown };
      if (parsed.name === 'mimiclaw-ws' && typeof parsed.version === 'string') return (cached = parsed.version);
    } catch {
      // Not here; try the next place.
    }
  }
  return (cached = '0.0.0');
}
