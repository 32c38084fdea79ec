// The test load balancer in front of two single relays (separate data dirs): WebSocket
// connections alternate between the backends, a stopped or killed backend is skipped, admin
// HTTP passes through, and closing either end closes the other.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import { startRelayProcess } from './fault-support';
import { authBoss, authEmployee, connect, makeTempDir, startTestRelay, TEST_AUTHKEY, type RelayEndpoint, type TestRelay } from './support';
import { startBalancer, type Backend, type Balancer } from './tcp-balancer';

async function activeConnections(relay: RelayEndpoint): Promise<number> {
  const response = await fetch(`${relay.httpUrl}/health`);
  const body = (await response.json()) as { active_connections: number };
  return body.active_connections;
}

/** Polls until `read` returns `want`; fails with the last value seen after `timeoutMs`. */
async function waitFor<T>(what: string, read: () => Promise<T>, want: T, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = await read();
  while (last !== want) {
    if (Date.now() > deadline) assert.fail(`${what}: still ${String(last)} after ${timeoutMs} ms, wanted ${String(want)}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
    last = await read();
  }
}

/** One request on its own TCP connection (no keep-alive), so each goes through the balancer anew. */
function request(
  balancer: Balancer,
  method: string,
  route: string,
  headers: Record<string, string> = {},
  body?: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port: balancer.port, method, path: route, agent: false, headers: { connection: 'close', ...headers }, timeout: 10_000 },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as Record<string, unknown> }));
      },
    );
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error(`${method} ${route} through the balancer timed out`)));
    req.end(body);
  });
}

const backendOf = (relay: TestRelay): Backend => ({ host: '127.0.0.1', port: relay.relay.port });

describe('tcp-balancer in front of two relays', () => {
  let a: TestRelay;
  let b: TestRelay;
  let balancer: Balancer;

  before(async () => {
    a = await startTestRelay();
    b = await startTestRelay();
    assert.notEqual(a.dataDir, b.dataDir);
    balancer = await startBalancer([backendOf(a), backendOf(b)]);
  });

  after(async () => {
    await balancer.close();
    await a.dispose();
    await b.dispose();
  });

  it('sends WebSocket connections to the backends in turn', async () => {
    balancer.setBackends([backendOf(a), backendOf(b)]);
    const seen: [number, number][] = [];
    const sockets = [];
    for (let i = 0; i < 4; i++) {
      sockets.push(await authEmployee(balancer, `Worker-${i}`));
      seen.push([await activeConnections(a.relay), await activeConnections(b.relay)]);
    }
    assert.deepEqual(seen, [
      [1, 0],
      [1, 1],
      [2, 1],
      [2, 2],
    ]);
    // Both ends of each pair talk: a boss through the balancer reaches an employee on its node.
    const boss = await authBoss(balancer);
    const onA = await activeConnections(a.relay);
    assert.equal(onA, 3, 'the fifth connection goes to the first backend again');
    boss.socket.send({ type: 'message', to: sockets[0]!.id, payload: { n: 1 }, msg_id: 'via-balancer' });
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual(ack.delivered, [sockets[0]!.id]);
    const got = await sockets[0]!.socket.next('message');
    assert.deepEqual(got.payload, { n: 1 });
    for (const s of [...sockets, boss]) await s.socket.close();
    await waitFor('relay A connections after the clients closed', () => activeConnections(a.relay), 0);
    await waitFor('relay B connections after the clients closed', () => activeConnections(b.relay), 0);
    await waitFor('balancer open connections', async () => balancer.openConnections(), 0);
  });

  it('passes admin HTTP requests through, reads and authorised writes alike', async () => {
    balancer.setBackends([backendOf(a), backendOf(b)]);
    const onA = await authEmployee(a.relay, 'Only-on-A');
    const onB = await authEmployee(b.relay, 'Only-on-B');
    const first = await request(balancer, 'GET', '/employees');
    const second = await request(balancer, 'GET', '/api/employees');
    const names = (r: { body: Record<string, unknown> }) => (r.body.employees as { name: string; online: boolean }[]).filter((e) => e.online).map((e) => e.name);
    assert.equal(first.status, 200);
    assert.equal(second.status, 200);
    assert.deepEqual(names(first), ['Only-on-A']);
    assert.deepEqual(names(second), ['Only-on-B']);

    // A write with a body and the authkey header: the next backend is A again.
    const ban = await request(balancer, 'PUT', `/api/employees/${onA.id}/ban`, { 'x-auth-key': TEST_AUTHKEY, 'content-type': 'application/json' }, JSON.stringify({ banned: true }));
    assert.equal(ban.status, 200, JSON.stringify(ban.body));
    assert.equal(ban.body.banned, true);
    assert.equal((await onA.socket.closed).code, 4008);
    // Without the key the relay's 401 comes back unchanged.
    const refused = await request(balancer, 'POST', `/api/employees/${onB.id}/ban`);
    assert.equal(refused.status, 401);
    assert.equal(refused.body.code, 'unauthorized');
    await onB.socket.close();
  });

  it('skips a backend that refuses connections', async () => {
    // A port that was free a moment ago refuses; so does a relay that has stopped.
    const dead = net.createServer();
    await new Promise<void>((resolve) => dead.listen(0, '127.0.0.1', resolve));
    const deadPort = (dead.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => dead.close(() => resolve()));
    balancer.setBackends([{ host: '127.0.0.1', port: deadPort }, backendOf(a), backendOf(b)]);
    const before = balancer.accepted();
    const sockets = [];
    for (let i = 0; i < 3; i++) sockets.push(await authEmployee(balancer, `Survivor-${i}`));
    // Round robin starts at the dead port each third connection and moves on to the next node.
    const after = balancer.accepted();
    const gained = (backend: Backend) => (after.get(`${backend.host}:${backend.port}`) ?? 0) - (before.get(`${backend.host}:${backend.port}`) ?? 0);
    assert.equal(gained({ host: '127.0.0.1', port: deadPort }), 0);
    assert.equal(gained(backendOf(a)), 2);
    assert.equal(gained(backendOf(b)), 1);
    for (const s of sockets) await s.socket.close();
  });

  it('closes the client when its node goes away, and skips the stopped node afterwards', async () => {
    const c = await startTestRelay();
    try {
      balancer.setBackends([backendOf(c), backendOf(a)]);
      const onC = await authEmployee(balancer, 'On-C');
      assert.equal(await activeConnections(c.relay), 1);
      await c.relay.close();
      assert.equal((await onC.socket.closed).code, 1001);
      const next = [];
      for (let i = 0; i < 2; i++) next.push(await authEmployee(balancer, `After-C-${i}`));
      assert.equal(await activeConnections(a.relay), 2, 'both new connections landed on the node still running');
      for (const s of next) await s.socket.close();
    } finally {
      await c.dispose();
    }
  });

  it('skips a node killed with SIGKILL, and its clients see their sockets close', async () => {
    const dir = await makeTempDir();
    const killed = await startRelayProcess(dir);
    try {
      const port = Number(new URL(killed.httpUrl).port);
      balancer.setBackends([{ host: '127.0.0.1', port }, backendOf(b)]);
      const onKilled = await authEmployee(balancer, 'On-killed-node');
      assert.equal(await activeConnections(killed), 1);
      killed.child.child.kill('SIGKILL');
      await killed.child.exited;
      assert.equal((await onKilled.socket.closed).code, 1006);
      const next = [];
      for (let i = 0; i < 2; i++) next.push(await authEmployee(balancer, `After-kill-${i}`));
      assert.equal(await activeConnections(b.relay), 2, 'both new connections landed on the node still running');
      for (const s of next) await s.socket.close();
    } finally {
      killed.child.child.kill('SIGKILL');
      await killed.child.exited;
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('closes a client at once when no backend accepts', async () => {
    const dead = net.createServer();
    await new Promise<void>((resolve) => dead.listen(0, '127.0.0.1', resolve));
    const deadPort = (dead.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => dead.close(() => resolve()));
    balancer.setBackends([{ host: '127.0.0.1', port: deadPort }]);
    const socket = await connect(balancer).then(
      () => 'opened',
      (error: unknown) => (error instanceof Error ? error.message : String(error)),
    );
    assert.notEqual(socket, 'opened');
    await waitFor('balancer open connections', async () => balancer.openConnections(), 0);
  });

  it('refuses a backend that is not on loopback', () => {
    assert.throws(() => balancer.setBackends([{ host: '10.0.0.1', port: 80 }]), /must be loopback/);
  });
});
