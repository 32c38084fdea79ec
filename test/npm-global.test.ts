// `npm pack` then `npm install -g <tarball>` into a temp prefix gives a working mimiclaw-ws
// command: it prints the package version, its postinstall made the data dir, the relay answers.
// So does `npm install -g <folder>` of a fresh clone (nothing built, no node_modules): its
// prepare script builds it. Installing fetches the dependencies from the npm registry (or npm's
// cache).

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { npmInvocation } from '../scripts/build-sea';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { makeTempDir } from './support';

const root = path.resolve(__dirname, '..', '..');
const npm = npmInvocation();

let work: string;
let tarball: string;
let packedFiles: string[];
let prefix: string;
let relayHome: string;
let env: NodeJS.ProcessEnv;

async function runNpm(args: string[], cwd: string): Promise<string> {
  const result = await runToEnd(npm.command, [...npm.prefix, ...args, '--no-audit', '--no-fund', '--loglevel=error'], env, 4 * 60_000, cwd);
  assert.equal(result.code, 0, `npm ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

before(async () => {
  work = await makeTempDir('mimiclaw-npm-global-');
  prefix = path.join(work, 'prefix');
  relayHome = path.join(work, 'relay-home');
  // The command's shebang needs a node on PATH, as on any user's machine with npm.
  env = { ...process.env, MIMICLAW_RELAY_HOME: relayHome, PATH: `${path.dirname(process.execPath)}${path.delimiter}${process.env.PATH ?? ''}` };
  // Under `npm test` these point at this checkout and /usr; the install must use only --prefix.
  for (const inherited of ['npm_config_local_prefix', 'npm_config_prefix', 'npm_config_global_prefix']) delete env[inherited];
  const packed = JSON.parse(await runNpm(['pack', '--json', '--pack-destination', work], root)) as { filename: string; files: { path: string }[] }[];
  tarball = path.join(work, packed[0]!.filename);
  packedFiles = packed[0]!.files.map((file) => file.path);
  await fs.mkdir(prefix);
  await runNpm(['install', '--global', '--prefix', prefix, tarball], work);
}, { timeout: 5 * 60_000 });

after(async () => {
  if (work) await fs.rm(work, { recursive: true, force: true });
});

describe('npm install -g of the packed tarball', () => {
  it('packs only what a user needs', () => {
    for (const needed of ['package.json', 'README.md', 'LICENSE', 'docs/PROTOCOL.md', 'dist/cli.js', 'dist/server.js', 'dist/server.d.ts', 'scripts/postinstall.js']) {
      assert.ok(packedFiles.includes(needed), `${needed} is missing from the tarball`);
    }
    const extra = packedFiles.filter(
      (file) => !/^(package\.json|README\.md|LICENSE(\.\w+)?|docs\/PROTOCOL\.md|scripts\/postinstall\.js)$/.test(file) && !/^dist\/.+\.(js|d\.ts)$/.test(file),
    );
    assert.deepEqual(extra, []);
    assert.deepEqual(packedFiles.filter((file) => /^dist\/(test|scripts|bench)\//.test(file)), []);
  });

  it('gives a mimiclaw-ws command that prints the package version', async () => {
    const manifest = JSON.parse(await fs.readFile(path.join(root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(path.join(prefix, 'bin', 'mimiclaw-ws'), ['--version'], env);
    assert.equal(version.code, 0, version.stderr);
    assert.equal(version.stdout.trim(), manifest.version);
  });

  it('ran the postinstall, which made the data dir', async () => {
    assert.ok((await fs.stat(relayHome)).isDirectory());
  });

  it('starts the relay, which answers /health and exits 0 on SIGTERM', { timeout: 30_000 }, async () => {
    const port = await freePort();
    const dataDir = path.join(work, 'data');
    const relay = new ChildRelay(path.join(prefix, 'bin', 'mimiclaw-ws'), [String(port), 'npm-test-key', dataDir], env, port);
    try {
      const health = await relay.waitForHealth();
      assert.equal(health.ok, true);
      assert.ok((await fs.stat(dataDir)).isDirectory());
    } finally {
      await relay.stop('SIGTERM').catch(() => undefined);
    }
    assert.deepEqual(await relay.exited, { code: 0, signal: null });
  });
});

describe('npm install -g of a fresh clone (a folder, nothing built)', () => {
  it('builds it (prepare) and gives a working mimiclaw-ws command', { timeout: 5 * 60_000 }, async () => {
    const clone = path.join(work, 'clone');
    const skip = new Set(['node_modules', 'dist', '.cache', 'release', '.git']);
    await fs.cp(root, clone, { recursive: true, filter: (source) => !skip.has(path.relative(root, source).split(path.sep)[0]!) });
    const folderPrefix = path.join(work, 'folder-prefix');
    await fs.mkdir(folderPrefix);
    await runNpm(['install', '--global', '--prefix', folderPrefix, clone], work);
    const manifest = JSON.parse(await fs.readFile(path.join(root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(path.join(folderPrefix, 'bin', 'mimiclaw-ws'), ['--version'], env);
    assert.equal(version.code, 0, version.stderr);
    assert.equal(version.stdout.trim(), manifest.version);
  });
});
