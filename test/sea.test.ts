// The standalone executable of this machine runs the relay with no Node on PATH. It is built
// from the Node running the tests (nothing is downloaded) into .cache/sea/host/ when missing or
// older than its sources. The four release files are checked by `npm run test:release`
// (test/release-checks/).

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { buildPaths, hostExecutable } from '../scripts/build-sea';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { makeTempDir, TestSocket, type Frame } from './support';

const paths = buildPaths(path.resolve(__dirname, '..', '..'));
const binary = hostExecutable(paths).file;
const AUTHKEY = 'sea-test-key';

let emptyBin: string;
let noNodeEnv: NodeJS.ProcessEnv;
const scratch: string[] = [];

before(async () => {
  // A PATH holding nothing at all, so no `node` can be found.
  emptyBin = await makeTempDir('mimiclaw-sea-path-');
  scratch.push(emptyBin);
  noNodeEnv = { PATH: emptyBin, HOME: emptyBin };
}, { timeout: 60_000 });

describe('building this machine\'s executable', () => {
  it('needs no download: it builds with an empty runtime cache and no npm registry', { timeout: 3 * 60_000 }, async () => {
    const cache = await makeTempDir('mimiclaw-sea-cache-');
    scratch.push(cache);
    const env = { ...process.env, MIMICLAW_RUNTIME_CACHE: cache, npm_config_registry: `http://127.0.0.1:${await freePort()}/`, npm_config_fetch_retries: '0' };
    const built = await runToEnd(process.execPath, [path.join(paths.root, 'dist', 'scripts', 'build-sea.js'), '--host'], env, 3 * 60_000, paths.root);
    assert.equal(built.code, 0, built.stderr);
    assert.deepEqual(await fs.readdir(cache), [], 'no Node runtime was fetched');
    await fs.access(binary);
  });
});

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
  const relay = new ChildRelay(binary, [String(port), AUTHKEY, dataDir], noNodeEnv, port);
  await relay.waitForHealth();
  return relay;
}

describe("this machine's executable", () => {
  it('has no node on the PATH it runs with', async () => {
    const which = await runToEnd('/bin/sh', ['-c', 'command -v node || echo none'], noNodeEnv);
    assert.equal(which.stdout.trim(), 'none');
  });

  it('prints the package version and help, with no warning', async () => {
    const manifest = JSON.parse(await fs.readFile(path.join(paths.root, 'package.json'), 'utf8')) as { version: string };
    const version = await runToEnd(binary, ['--version'], noNodeEnv);
    assert.equal(version.code, 0);
    assert.equal(version.stdout.trim(), manifest.version);
    assert.equal(version.stderr, '');
    const help = await runToEnd(binary, ['--help'], noNodeEnv);
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
