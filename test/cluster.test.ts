// Cluster mode (docs/CLUSTER.md): two and three relays in this process on one real
// redis-server, plus relays as child processes where a node must be killed or must fail to
// start. Every node gets its own data dir; the test starts and stops its own Redis.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import httpModule from 'node:http';
import path from 'node:path';
import { describe, test } from 'node:test';
import { RelayClient } from '../client';
import { parseCommandLine } from '../lib/cli-args';
import type { RelayOptions } from '../server';
import { freePort } from './child-relay';
import { CHILD_AUTHKEY, eventually, startRelayProcess, type RelayProcess } from './fault-support';
import { useClusterFixture } from './cluster-fixture';
import { startRedis, type TestRedis } from './redis-harness';
import { startBalancer } from './tcp-balancer';
import { authBoss, authEmployee, connect, http, makeTempDir, reconnect, startTestRelay, TEST_AUTHKEY, type Authed, type TestRelay } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

let redis: TestRedis;
let clusterSeq = 0;

const leftovers = useClusterFixture((started) => {
  redis = started;
});

async function startChild(dir: string, args: string[]): Promise<RelayProcess> {
  const started = await startRelayProcess(dir, args);
  leftovers.children.push(started);
  return started;
}

async function startTracked(options: Partial<RelayOptions>): Promise<TestRelay> {
  const started = await startTestRelay(options);
  leftovers.relays.push(started);
  return started;
}

/** `count` nodes of a fresh cluster (its own key prefix) on the test's Redis. */
async function startCluster(count: number, overrides: Partial<RelayOptions> = {}): Promise<{ nodes: TestRelay[]; name: string; dispose(): Promise<void> }> {
  const name = `t${process.pid}-${clusterSeq++}`;
  const nodes: TestRelay[] = [];
  for (let i = 0; i < count; i++) nodes.push(await startTracked({ redisUrl: redis.url, clusterName: name, nodeId: `node-${i}`, ...overrides }));
  return {
    nodes,
    name,
    async dispose() {
      for (const node of nodes) await node.dispose();
    },
  };
}

/** Waits until Redis shows `id` online on `node` (presence is written just after auth_ok). */
async function presenceIs(name: string, id: string, node: string | null): Promise<void> {
  await eventually(`${id} is on ${String(node)}`, async () => (await redis.client.hget(`${name}:presence`, id)) === node);
}

describe('cluster: command line', () => {
  test('--redis, --cluster, --node-id and MIMICLAW_REDIS_URL are checked and named in errors', () => {
    const run = (argv: string[], env: NodeJS.ProcessEnv = {}) => parseCommandLine([...argv, '--authkey', 'k'], env);
    const parsed = run(['--redis', 'redis://127.0.0.1:6390', '--cluster', 'blue', '--node-id', 'n-1']);
    assert.equal(parsed.kind, 'run');
    if (parsed.kind === 'run') assert.deepEqual([parsed.options.redisUrl, parsed.options.clusterName, parsed.options.nodeId], ['redis://127.0.0.1:6390', 'blue', 'n-1']);
    const fromEnv = run([], { MIMICLAW_REDIS_URL: 'rediss://cache.internal:6380' });
    assert.equal(fromEnv.kind === 'run' ? fromEnv.options.redisUrl : null, 'rediss://cache.internal:6380');
    assert.throws(() => run(['--redis', 'localhost']), /--redis must be a redis:\/\/ or rediss:\/\/ URL/);
    assert.throws(() => run(['--cluster', 'two words']), /--cluster must be 1 to 63 letters/);
    assert.throws(() => run(['--node-id', 'a/b']), /--node-id must be 1 to 63 letters/);
    assert.throws(() => run([], { MIMICLAW_REDIS_URL: 'http://x' }), /MIMICLAW_REDIS_URL must be a redis:\/\/ or rediss:\/\/ URL/);
  });
});

describe('cluster: one relay across nodes', () => {
  test('each node has its own id, in /health and on its handle', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      assert.equal(a.relay.nodeId, 'node-0');
      assert.equal(a.relay.clusterName, cluster.name);
      const health = (await http(a.relay, 'GET', '/health')).body;
      assert.equal(health.node, 'node-0');
      assert.deepEqual(health.cluster, { name: cluster.name, store: 'up', node_connections: 0 });
      assert.equal((await http(b.relay, 'GET', '/health')).body.node, 'node-1');
      // Who is online is answered for the whole cluster on every node.
      const employee = await authEmployee(a.relay, 'Seen', ['ops']);
      const onlineOn = async (node: TestRelay) => {
        const list = (await http(node.relay, 'GET', '/employees')).body.employees as { id: string; online: boolean }[];
        return list.find((e) => e.id === employee.id)?.online;
      };
      await eventually('node-1 shows the employee online', async () => (await onlineOn(b)) === true);
      // /health counts the whole cluster's sessions on every node; each node's own under cluster.
      for (const [node, own] of [[a, 1], [b, 0]] as const) {
        const body = (await http(node.relay, 'GET', '/health')).body;
        assert.deepEqual([body.active_connections, body.online, (body.cluster as { node_connections: number }).node_connections], [1, { boss: 0, employee: 1 }, own]);
      }
      // An ephemeral boss is known only to its node, and counted on the others too.
      const passing = await connect(a.relay);
      passing.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY, ephemeral: true });
      await passing.next('auth_ok');
      await eventually('node-1 counts the ephemeral boss', async () => (await http(b.relay, 'GET', '/health')).body.active_connections === 2);
      assert.deepEqual((await http(b.relay, 'GET', '/health')).body.online, { boss: 1, employee: 1 });
      await passing.close();
      // And which node holds it, in /employees and /admin/workforce.
      const listed = ((await http(b.relay, 'GET', '/employees')).body.employees as { id: string; node: string | null }[]).find((e) => e.id === employee.id);
      assert.equal(listed?.node, 'node-0');
      const workforce = (await http(b.relay, 'GET', '/admin/workforce')).body.employees as { id: string; node: string | null }[];
      assert.equal(workforce.find((e) => e.id === employee.id)?.node, 'node-0');
      await employee.socket.close();
      await eventually('node-1 shows the employee offline', async () => (await onlineOn(b)) === false);
    } finally {
      await cluster.dispose();
    }
  });

  test('a message to an id on another node is delivered there, and the ack says so', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Far', ['research']);
      // Presence is written before auth_ok: a client told auth_ok is reachable from every node.
      assert.equal(await redis.client.hget(`${cluster.name}:presence`, employee.id), 'node-0');
      const boss = await authBoss(b.relay);
      boss.socket.send({ type: 'message', to: employee.id, payload: { task: 1 }, msg_id: 'm-1' });
      const got = await employee.socket.next('message');
      assert.equal(got.from_id, boss.id);
      assert.equal(got.to, employee.id);
      assert.deepEqual(got.payload, { task: 1 });
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual(ack.delivered, [employee.id]);
      assert.deepEqual(ack.failed, []);
      // And back, employee → boss, the other way across.
      employee.socket.send({ type: 'message', to: [boss.id, 'employee-unknown'], payload: 'done' });
      assert.equal((await boss.socket.next('message')).payload, 'done');
      const back = await employee.socket.next('delivery_ack');
      assert.deepEqual(back.delivered, [boss.id]);
      assert.deepEqual(back.failed, [{ id: 'employee-unknown', reason: 'target_not_found' }]);
      await Promise.all([boss.socket.close(), employee.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('an identity registered on one node reconnects on another; its older socket closes with 4000', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const first = await authEmployee(a.relay, 'Mover', ['ops']);
      const disconnects: number[] = [];
      a.relay.events.subscribe((event) => {
        if (event.type === 'disconnect' && event.node.id === first.id) disconnects.push(event.code);
      });
      const again = await reconnect(b.relay, first, 'employee');
      assert.equal(again.ok.type, 'auth_ok');
      assert.equal(again.ok.reconnected, true);
      assert.equal((await first.socket.closed).code, 4000);
      await presenceIs(cluster.name, first.id, 'node-1');
      // Still online (on node-1): node-0 does not announce a disconnect for the replaced socket.
      await eventually('node-0 let the replaced socket go', async () => ((await http(a.relay, 'GET', '/health')).body.cluster as { node_connections: number }).node_connections === 0);
      assert.deepEqual(disconnects, []);
      // The old node's disconnect did not take the new node's presence away.
      const boss = await authBoss(a.relay);
      boss.socket.send({ type: 'message', to: first.id, payload: 'here?' });
      assert.equal((await again.socket.next('message')).payload, 'here?');
      assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [first.id]);
      await Promise.all([boss.socket.close(), again.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('a late replace announcement of an older session closes neither the newer session nor moves its presence back', async () => {
    const cluster = await startCluster(3);
    const control = redis.client.duplicate();
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const announced: string[] = [];
      control.on('message', (_channel: string, text: string) => announced.push(text));
      await control.subscribe(`${cluster.name}:control`);
      const first = await authEmployee(a.relay, 'Early', ['ops']);
      const isFirstJoin = (text: string) => {
        const message = JSON.parse(text) as Record<string, unknown>;
        return message.t === 'replace' && message.id === first.id && message.node === 'node-0';
      };
      await eventually('node-0 announced its session', () => announced.some(isFirstJoin));
      const second = await reconnect(b.relay, first, 'employee');
      assert.equal(second.ok.type, 'auth_ok');
      assert.equal((await first.socket.closed).code, 4000);
      await presenceIs(cluster.name, first.id, 'node-1');
      // node-0's announcement arrives once more, late (as when Redis hands it over after the
      // newer session went online): it is older than the session on node-1.
      await redis.client.publish(`${cluster.name}:control`, announced.find(isFirstJoin)!);
      // An announcement published after it: once the nodes act on this one, they had that one.
      const marker = await authEmployee(b.relay, 'Marker', ['ops']);
      assert.equal((await http(a.relay, 'POST', `/employees/${marker.id}/ban`, { authkey: TEST_AUTHKEY })).status, 200);
      assert.equal((await marker.socket.closed).code, 4008);
      const listed = async () => (await http(c.relay, 'GET', '/employees')).body.employees as { id: string; banned: boolean; node: string | null }[];
      await eventually('node-2 knows the ban', async () => (await listed()).some((e) => e.id === marker.id && e.banned));
      assert.equal((await listed()).find((e) => e.id === first.id)?.node, 'node-1', 'node-2 still places the identity on node-1');
      second.socket.send({ type: 'ping' });
      assert.equal((await second.socket.next()).type, 'pong', 'the newer session is still open');
      const boss = await authBoss(c.relay);
      boss.socket.send({ type: 'message', to: first.id, payload: 'still there?' });
      assert.equal((await second.socket.next('message')).payload, 'still there?');
      assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [first.id]);
      await Promise.all([boss.socket.close(), second.socket.close()]);
    } finally {
      control.disconnect();
      await cluster.dispose();
    }
  });

  test('a ban on one node closes the employee on another with 4008; routes and reconnects are refused everywhere', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Rogue', ['ops']);
      await presenceIs(cluster.name, employee.id, 'node-0');
      const banned = await http(b.relay, 'POST', `/employees/${employee.id}/ban`, { authkey: TEST_AUTHKEY });
      assert.equal(banned.status, 200);
      assert.equal(banned.body.banned, true);
      const system = await employee.socket.next('system');
      assert.equal(system.event, 'banned');
      assert.equal((await employee.socket.closed).code, 4008);
      const boss = await authBoss(a.relay);
      await eventually('node-0 knows the ban', async () => {
        boss.socket.send({ type: 'message', to: employee.id, payload: 'x' });
        const ack = await boss.socket.next('delivery_ack');
        return JSON.stringify(ack.failed) === JSON.stringify([{ id: employee.id, reason: 'target_banned' }]);
      });
      const refused = await reconnect(b.relay, employee, 'employee');
      assert.equal(refused.ok.code, 'banned');
      const unbanned = await http(a.relay, 'DELETE', `/employees/${employee.id}/ban`, { authkey: TEST_AUTHKEY });
      assert.equal(unbanned.body.banned, false);
      const back = await reconnect(b.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('a msg_id resent through another node is answered with the first ack, not routed again', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Once', ['ops']);
      const boss = await authBoss(a.relay);
      boss.socket.send({ type: 'message', to: employee.id, payload: 'one', msg_id: 'same-id' });
      const first = await boss.socket.next('delivery_ack');
      assert.deepEqual(first.delivered, [employee.id]);
      await employee.socket.next('message');
      const moved = await reconnect(b.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
      assert.equal(moved.ok.type, 'auth_ok');
      moved.socket.send({ type: 'message', to: employee.id, payload: 'one', msg_id: 'same-id' });
      const repeat = await moved.socket.next('delivery_ack');
      assert.equal(repeat.duplicate, true);
      assert.deepEqual(repeat.delivered, [employee.id]);
      // Not delivered twice: the next message the employee gets is a new one.
      moved.socket.send({ type: 'message', to: employee.id, payload: 'two', msg_id: 'other-id' });
      assert.equal((await employee.socket.next('message')).payload, 'two');
      await Promise.all([moved.socket.close(), employee.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('a message queued on one node is delivered, in order, on the node the target comes back to', async () => {
    const cluster = await startCluster(3);
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Away', ['ops']);
      await employee.socket.close();
      await presenceIs(cluster.name, employee.id, null);
      const boss = await authBoss(b.relay);
      for (const n of [1, 2, 3]) {
        boss.socket.send({ type: 'message', to: employee.id, payload: { n }, queue: true, msg_id: `q-${n}` });
        const ack = await boss.socket.next('delivery_ack');
        assert.deepEqual(ack.queued, [employee.id]);
        assert.deepEqual(ack.delivered, []);
      }
      const back = await reconnect(c.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      for (const n of [1, 2, 3]) assert.deepEqual((await back.socket.next('message')).payload, { n });
      for (const n of [1, 2, 3]) {
        const update = await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === `q-${n}`);
        assert.equal(update.status, 'delivered');
        assert.equal(update.id, employee.id);
      }
      assert.equal(await redis.client.llen(`${cluster.name}:queue:${employee.id}`), 0);
      // The sender's node logged the final status.
      await eventually('the log says delivered', async () => {
        const rows = (await http(b.relay, 'GET', `/admin/communications?employee_id=${employee.id}`)).body.rows as { delivery: { status: string } }[];
        return rows.length === 3 && rows.every((row) => row.delivery.status === 'delivered');
      });
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('a backlog bigger than the socket may hold drains in order, in pieces, each copy once', async () => {
    const cluster = await startCluster(2, { maxBufferedBytes: 4096 });
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Backlog', ['ops']);
      await employee.socket.close();
      await presenceIs(cluster.name, employee.id, null);
      const boss = await authBoss(b.relay);
      const count = 200;
      const filler = 'x'.repeat(200);
      for (let n = 0; n < count; n++) boss.socket.send({ type: 'message', to: employee.id, payload: { n, filler }, queue: true, msg_id: `b-${n}` });
      for (let n = 0; n < count; n++) assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [employee.id]);
      const back = await reconnect(b.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      for (let n = 0; n < count; n++) assert.equal(((await back.socket.next('message')).payload as { n: number }).n, n);
      await eventually('the shared queue is empty', async () => (await redis.client.llen(`${cluster.name}:queue:${employee.id}`)) === 0);
      boss.socket.send({ type: 'message', to: employee.id, payload: { n: 'last' } });
      assert.deepEqual(((await back.socket.next('message')).payload as { n: string }).n, 'last');
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('a newer queued message waits behind a backlog drained on another node, from the sender\'s node and from the holder\'s', async () => {
    // ~2 KB copies against a 64 KiB bound: the holder drains in many pieces, each through Redis.
    const cluster = await startCluster(3, { maxBufferedBytes: 64 * 1024 });
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Behind', ['ops']);
      await employee.socket.close();
      await presenceIs(cluster.name, employee.id, null);
      const boss = await authBoss(b.relay);
      const count = 300;
      const pad = 'x'.repeat(2000);
      for (let n = 0; n < count; n++) boss.socket.send({ type: 'message', to: employee.id, payload: { n, pad }, queue: true, msg_id: `old-${n}` });
      for (let n = 0; n < count; n++) assert.deepEqual((await boss.socket.next('delivery_ack', 15_000)).queued, [employee.id]);
      // The queue is the cluster's: every node reports it, without a node label.
      const depth = async (node: TestRelay) => /^mimiclaw_queue_depth (\d+)$/m.exec(await (await fetch(`${node.relay.httpUrl}/metrics`)).text())?.[1];
      assert.equal(await depth(c), String(count));

      const back = await reconnect(a.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      const local = await authBoss(a.relay);
      await back.socket.next('message', 15_000);
      // The holder (node-0) is writing the backlog: a queued message from node-1 goes behind it...
      boss.socket.send({ type: 'message', to: employee.id, payload: 'newer', queue: true, msg_id: 'newer' });
      const newer = await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'newer', 15_000);
      assert.deepEqual([newer.delivered, newer.queued, newer.failed], [[], [employee.id], []], 'queued behind the backlog');
      // ...and so does one from a sender on node-0 itself.
      local.socket.send({ type: 'message', to: employee.id, payload: 'local', queue: true, msg_id: 'local' });
      assert.deepEqual((await local.socket.next('delivery_ack', 15_000)).queued, [employee.id]);
      // A message that may not be queued is written at once, as on one node.
      boss.socket.send({ type: 'message', to: employee.id, payload: 'live', msg_id: 'live' });
      assert.deepEqual((await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'live', 15_000)).delivered, [employee.id]);

      // Once 'local' arrives, everything before it has: the frames taken so far, in arrival order.
      await back.socket.next((f) => f.type === 'message' && f.msg_id === 'local', 30_000);
      const arrived = [...back.socket.frames.filter((f) => f.type === 'message').map((f) => String(f.msg_id)), 'local'];
      const queued = arrived.filter((id) => id !== 'live');
      assert.deepEqual(queued.slice(-2), ['newer', 'local'], 'the newer messages come last');
      assert.deepEqual(queued.slice(0, -2), Array.from({ length: count - 1 }, (_, n) => `old-${n + 1}`), 'the backlog arrives whole and in order');
      await eventually('the cluster store is empty', async () => (await depth(c)) === '0');
      await Promise.all([boss.socket.close(), local.socket.close(), back.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('queued copies in the cluster store expire on time, and past --max-queued the oldest expire', async () => {
    const cluster = await startCluster(2, { maxQueuedPerTarget: 2 });
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Gone', ['ops']);
      await employee.socket.close();
      await presenceIs(cluster.name, employee.id, null);
      const boss = await authBoss(b.relay);
      boss.socket.send({ type: 'message', to: employee.id, payload: 'short', queue: true, ttl_ms: 300, msg_id: 'short' });
      assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [employee.id]);
      const expired = await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === 'short', 10_000);
      assert.equal(expired.status, 'expired');
      for (const n of [1, 2, 3]) {
        boss.socket.send({ type: 'message', to: employee.id, payload: { n }, queue: true, msg_id: `cap-${n}` });
        assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [employee.id]);
      }
      const dropped = await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === 'cap-1');
      assert.equal(dropped.status, 'expired');
      const back = await reconnect(a.relay, employee, 'employee');
      assert.deepEqual((await back.socket.next('message')).payload, { n: 2 });
      assert.deepEqual((await back.socket.next('message')).payload, { n: 3 });
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('broadcast and tag: routing reaches the targets on every node', async () => {
    const cluster = await startCluster(3);
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const onA = await authEmployee(a.relay, 'A', ['research']);
      const onB = await authEmployee(b.relay, 'B', ['research']);
      const onC = await authEmployee(c.relay, 'C', ['ops']);
      const boss = await authBoss(a.relay);
      await presenceIs(cluster.name, onB.id, 'node-1');
      await presenceIs(cluster.name, onC.id, 'node-2');
      await eventually('every node is seen by node-0', async () => {
        boss.socket.send({ type: 'message', to: '*', payload: 'ping-all' });
        const ack = await boss.socket.next('delivery_ack');
        return (ack.delivered as string[]).length === 3;
      });
      for (const who of [onA, onB, onC]) {
        const got = await who.socket.next((f) => f.type === 'message' && f.payload === 'ping-all');
        assert.equal(got.to, who.id);
      }
      boss.socket.send({ type: 'message', to: 'tag:research', payload: 'research only' });
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual([...(ack.delivered as string[])].sort(), [onA.id, onB.id].sort());
      assert.equal((await onB.socket.next((f) => f.type === 'message' && f.payload === 'research only')).to, onB.id);
      await Promise.all([boss.socket.close(), onA.socket.close(), onB.socket.close(), onC.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('/api/events on one node streams the events of the other nodes too', async () => {
    const cluster = await startCluster(2);
    let request: httpModule.ClientRequest | null = null;
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      let text = '';
      await new Promise<void>((resolve, reject) => {
        request = httpModule.get(`${b.relay.httpUrl}/api/events`, (res) => {
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => (text += chunk));
          res.on('error', () => undefined);
          resolve();
        });
        request.on('error', reject);
      });
      // Each try is a new employee on node-0: the first ones may come before node-1 listens.
      const seen: string[] = [];
      await eventually('node-1 streams a connect from node-0', async () => {
        const employee = await authEmployee(a.relay, 'Evented', ['ops']);
        seen.push(employee.id);
        await employee.socket.close();
        await new Promise((resolve) => setTimeout(resolve, 200));
        return seen.some((id) => text.includes(`"id":"${id}"`));
      }, 15_000);
      assert.ok(text.includes('"relay_node":"node-0"'), 'a connect event names the node holding the socket');
      const own = await authEmployee(b.relay, 'Local', ['ops']);
      await eventually('its own events too', () => text.includes(`"id":"${own.id}"`));
      await own.socket.close();
    } finally {
      (request as httpModule.ClientRequest | null)?.destroy();
      await cluster.dispose();
    }
  });

  test('/admin/communications on any node lists the messages logged on every node; /metrics has a node label', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(b.relay, 'Talker', ['research']);
      const boss = await authBoss(a.relay);
      boss.socket.send({ type: 'message', to: employee.id, payload: 'question', msg_id: 'c-1' });
      const firstAck = await boss.socket.next('delivery_ack');
      assert.deepEqual(firstAck.delivered, [employee.id]);
      await employee.socket.next('message');
      // Newest first needs two different milliseconds.
      await eventually('the clock moved on', () => Date.now() > Number(firstAck.timestamp) + 1);
      employee.socket.send({ type: 'message', to: boss.id, payload: 'answer', msg_id: 'c-2' });
      assert.deepEqual((await employee.socket.next('delivery_ack')).delivered, [boss.id]);
      await eventually('both nodes see each other', async () => {
        const body = (await http(a.relay, 'GET', '/admin/communications')).body;
        return (body.nodes as { answered: number }).answered === 2;
      });
      for (const node of [a, b]) {
        const body = (await http(node.relay, 'GET', `/admin/communications?employee_id=${employee.id}`)).body;
        assert.equal(body.total, 2);
        const rows = body.rows as { msg_id: string; direction: string; delivery: { status: string } }[];
        assert.deepEqual(rows.map((row) => row.msg_id), ['c-2', 'c-1']);
        assert.deepEqual(rows.map((row) => row.direction), ['employee_to_boss', 'boss_to_employee']);
        assert.ok(rows.every((row) => row.delivery.status === 'delivered'));
        const paged = (await http(node.relay, 'GET', `/admin/communications?employee_id=${employee.id}&offset=1&limit=1`)).body;
        assert.deepEqual((paged.rows as { msg_id: string }[]).map((row) => row.msg_id), ['c-1']);
      }
      const metrics = await fetch(`${b.relay.httpUrl}/metrics`).then((res) => res.text());
      assert.match(metrics, /mimiclaw_connections\{[^}]*node="node-1"/);
      await Promise.all([boss.socket.close(), employee.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('an identity active on one node is seen as active on the others (heartbeat staleness is cluster-wide)', async () => {
    const cluster = await startCluster(2);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(a.relay, 'Busy', ['ops']);
      const lastSeenOn = async (node: TestRelay) =>
        ((await http(node.relay, 'GET', '/employees')).body.employees as { id: string; last_seen: number }[]).find((e) => e.id === employee.id)?.last_seen ?? 0;
      await eventually('node-1 knows the employee', async () => (await lastSeenOn(b)) > 0);
      const connectedSeen = await lastSeenOn(b);
      await eventually('the clock moved on', () => Date.now() > connectedSeen + 5);
      employee.socket.send({ type: 'ping' });
      await employee.socket.next('pong');
      const pingedAt = await lastSeenOn(a);
      assert.ok(pingedAt > connectedSeen);
      await eventually('node-1 sees the ping', async () => (await lastSeenOn(b)) >= pingedAt, 20_000);
      await employee.socket.close();
    } finally {
      await cluster.dispose();
    }
  });

  test('a second node with the same node id is refused with a clear message', async () => {
    const cluster = await startCluster(1);
    try {
      const refused = await startRefused({ redisUrl: redis.url, clusterName: cluster.name, nodeId: 'node-0' });
      assert.match(refused.message, /Node id "node-0" is in use by another running node/);
    } finally {
      await cluster.dispose();
    }
  });

  test('two relays on one data dir: the second is refused', async () => {
    const first = await startTestRelay();
    try {
      const refused = await startRefused({}, first.dataDir);
      assert.match(refused.message, /is in use by another relay/);
    } finally {
      await first.dispose();
    }
  });
});

/** A minimal `/api/events` reader: each event's id, name and the name of the node it is about. */
async function openEventStream(baseUrl: string, lastEventId?: string): Promise<{ events: { id: string | null; event: string; name: string | null }[]; close(): void }> {
  const events: { id: string | null; event: string; name: string | null }[] = [];
  let buffer = '';
  const request = httpModule.get(`${baseUrl}/api/events`, { headers: lastEventId === undefined ? {} : { 'last-event-id': lastEventId } });
  await new Promise<void>((resolve, reject) => {
    request.on('error', reject);
    request.on('response', (res) => {
      res.setEncoding('utf8');
      res.on('error', () => undefined);
      res.on('data', (chunk: string) => {
        buffer += chunk;
        let end: number;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const fields = new Map<string, string>();
          for (const line of buffer.slice(0, end).split('\n')) {
            const colon = line.indexOf(':');
            if (colon > 0) fields.set(line.slice(0, colon), line.slice(colon + 1).replace(/^ /, ''));
          }
          buffer = buffer.slice(end + 2);
          if (!fields.has('data')) continue;
          const data = JSON.parse(fields.get('data')!) as { node?: { name?: string } };
          events.push({ id: fields.get('id') ?? null, event: fields.get('event') ?? 'message', name: data.node?.name ?? null });
        }
      });
      resolve();
    });
  });
  return { events, close: () => request.destroy() };
}

describe('cluster: /api/events', () => {
  test('a stream resumed with Last-Event-ID on another node gets exactly what it missed, from every node', async () => {
    const cluster = await startCluster(3);
    try {
      const [n0, n1, n2] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const seen = (stream: { events: { event: string; name: string | null }[] }) => stream.events.map((e) => `${e.event} ${String(e.name)}`);
      const first = await openEventStream(n0.relay.httpUrl);
      const before = [await authEmployee(n0.relay, 'Before-0'), await authEmployee(n1.relay, 'Before-1'), await authEmployee(n2.relay, 'Before-2')];
      await eventually('the first stream has every node s connect', () => ['Before-0', 'Before-1', 'Before-2'].every((name) => seen(first).includes(`connect ${name}`)));
      assert.equal(first.events.length, 3);
      const lastId = first.events[2]!.id!;
      first.close();

      // While no stream is open: events on every node.
      const during = [await authEmployee(n0.relay, 'During-0'), await authEmployee(n1.relay, 'During-1'), await authEmployee(n2.relay, 'During-2')];
      for (const employee of before) await employee.socket.close();
      const missed = ['connect During-0', 'connect During-1', 'connect During-2', 'disconnect Before-0', 'disconnect Before-1', 'disconnect Before-2'];

      const resumed = await openEventStream(n1.relay.httpUrl, lastId);
      await eventually('the resumed stream has every missed event', () => missed.every((event) => seen(resumed).includes(event)));
      // A last event on the resuming node: a repeat sent before it would show.
      const marker = await authEmployee(n1.relay, 'Marker');
      await eventually('the marker arrives', () => seen(resumed).includes('connect Marker'));
      assert.deepEqual(seen(resumed).slice(0, -1).sort(), missed.sort(), `got ${seen(resumed).join('; ')}`);
      assert.equal(seen(resumed).at(-1), 'connect Marker');
      resumed.close();
      for (const employee of [...during, marker]) await employee.socket.close();
    } finally {
      await cluster.dispose();
    }
  });
});

describe('cluster: identity delete and key rotation across nodes', () => {
  /** The auth answer of `who` with `key` on each node: every node must give the same one. */
  async function authOnEach(nodes: TestRelay[], who: { id: string; key: string }): Promise<string[]> {
    const answers: string[] = [];
    for (const node of nodes) {
      const back = await reconnect(node.relay, who, 'employee');
      answers.push(back.ok.type === 'auth_ok' ? 'auth_ok' : String(back.ok.code));
      await back.socket.close();
    }
    return answers;
  }

  test('DELETE on one node: the node holding the session closes it with 4010, every node refuses the id, the queue is dropped and counted', async () => {
    const cluster = await startCluster(3);
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const online = await authEmployee(a.relay, 'Held', ['ops']);
      await presenceIs(cluster.name, online.id, 'node-0');
      const deleted = await http(b.relay, 'DELETE', `/api/identities/${online.id}`, { authkey: TEST_AUTHKEY });
      assert.equal(deleted.status, 200, JSON.stringify(deleted.body));
      assert.equal(deleted.body.was_online, true);
      const notice = await online.socket.next('system');
      assert.equal(notice.event, 'identity_deleted');
      assert.equal((await online.socket.closed).code, 4010);
      await presenceIs(cluster.name, online.id, null);
      assert.equal(await redis.client.hexists(`${cluster.name}:identities`, online.id), 0);
      assert.deepEqual(await authOnEach(cluster.nodes, online), ['identity_not_found', 'identity_not_found', 'identity_not_found']);

      const away = await authEmployee(a.relay, 'Away', ['ops']);
      await away.socket.close();
      await presenceIs(cluster.name, away.id, null);
      const boss = await authBoss(c.relay);
      for (const msgId of ['q-1', 'q-2']) {
        boss.socket.send({ type: 'message', to: away.id, payload: msgId, msg_id: msgId, queue: true });
        assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [away.id]);
      }
      const dropped = await http(a.relay, 'DELETE', `/api/identities/${away.id}`, { authkey: TEST_AUTHKEY });
      assert.equal(dropped.status, 200, JSON.stringify(dropped.body));
      assert.deepEqual([dropped.body.was_online, dropped.body.dropped_queued], [false, 2]);
      for (const msgId of ['q-1', 'q-2']) {
        const update = await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === msgId);
        assert.equal(update.status, 'expired');
      }
      assert.equal(await redis.client.llen(`${cluster.name}:queue:${away.id}`), 0);
      assert.deepEqual(await authOnEach(cluster.nodes, away), ['identity_not_found', 'identity_not_found', 'identity_not_found']);
      for (const node of cluster.nodes) {
        const ids = ((await http(node.relay, 'GET', '/api/connections')).body.connections as { id: string }[]).map((n) => n.id);
        assert.ok(!ids.includes(away.id) && !ids.includes(online.id), `${node.relay.nodeId} still lists a deleted identity`);
      }
      await boss.socket.close();
    } finally {
      await cluster.dispose();
    }
  });

  test('rotate-key on one node: the node holding the session closes it with 4009; the new key works on every node, the old one on none', async () => {
    const cluster = await startCluster(3);
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const worker = await authEmployee(a.relay, 'Rotated', ['ops']);
      await presenceIs(cluster.name, worker.id, 'node-0');
      const answer = await http(b.relay, 'POST', `/api/identities/${worker.id}/rotate-key`, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200, JSON.stringify(answer.body));
      assert.equal(answer.body.was_online, true);
      assert.equal((await worker.socket.next('system')).event, 'key_rotated');
      assert.equal((await worker.socket.closed).code, 4009);
      const fresh = { id: worker.id, key: String(answer.body.key) };
      assert.deepEqual(await authOnEach(cluster.nodes, worker), ['invalid_identity_key', 'invalid_identity_key', 'invalid_identity_key']);
      assert.deepEqual(await authOnEach(cluster.nodes, fresh), ['auth_ok', 'auth_ok', 'auth_ok']);
      // The holder's last write of the identity (its disconnect) did not bring the old key back.
      assert.deepEqual(await authOnEach(cluster.nodes, worker), ['invalid_identity_key', 'invalid_identity_key', 'invalid_identity_key']);
    } finally {
      await cluster.dispose();
    }
  });

  test('--forget-offline-after on one node keeps an identity online on another node', async () => {
    const name = `t${process.pid}-${clusterSeq++}`;
    const holder = await startTracked({ redisUrl: redis.url, clusterName: name, nodeId: 'node-0' });
    const pruner = await startTracked({ redisUrl: redis.url, clusterName: name, nodeId: 'node-1', forgetOfflineAfterMs: 300, maintenanceIntervalMs: 1000 });
    try {
      const stays = await authEmployee(holder.relay, 'Stays', ['ops']);
      await presenceIs(name, stays.id, 'node-0');
      const gone = await authEmployee(holder.relay, 'Gone', ['ops']);
      await gone.socket.close();
      // The prune that takes `gone` (offline since after `stays` connected) had `stays` as a candidate too.
      await eventually('node-1 prunes the offline identity', async () => (await redis.client.hexists(`${name}:identities`, gone.id)) === 0);
      assert.equal(await redis.client.hexists(`${name}:identities`, stays.id), 1, 'an identity online on node-0 was pruned by node-1');
      const listed = ((await http(pruner.relay, 'GET', '/api/connections')).body.connections as { id: string }[]).map((n) => n.id);
      assert.ok(listed.includes(stays.id));
      await stays.socket.close();
    } finally {
      await pruner.dispose();
      await holder.dispose();
    }
  });
});

describe('cluster: limits', () => {
  test('wrong secrets spread over the nodes are throttled as on one relay; good auths write nothing to Redis', async () => {
    const cluster = await startCluster(3, { throttleLoopback: true, maxAuthFailures: 3 });
    try {
      const [a, b, c] = cluster.nodes as [TestRelay, TestRelay, TestRelay];
      const good = await authBoss(a.relay);
      await good.socket.close();
      assert.deepEqual(await redis.client.keys(`${cluster.name}:auth-fail:*`), [], 'a good auth must not cost a Redis write');
      // One wrong authkey on each node: three in the cluster, one per node.
      for (const node of [a, b, c]) {
        const socket = await connect(node.relay);
        socket.send({ type: 'auth', role: 'boss', authkey: 'wrong' });
        assert.equal((await socket.next('error')).code, 'invalid_authkey');
      }
      for (const node of [a, b, c]) {
        const socket = await connect(node.relay);
        socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
        const refused = await socket.next('error');
        assert.equal(refused.code, 'auth_throttled', `${node.relay.nodeId} let the guesser in`);
        assert.ok(Number(refused.retry_after_ms) > 0);
      }
    } finally {
      await cluster.dispose();
    }
  });

  test('--max-connections caps the sessions of the whole cluster; a reconnect of an identity online elsewhere still works', async () => {
    const cluster = await startCluster(2, { maxConnections: 2 });
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const first = await authEmployee(a.relay, 'One', ['ops']);
      const second = await authEmployee(a.relay, 'Two', ['ops']);
      await presenceIs(cluster.name, second.id, 'node-0');
      await eventually('node-1 counts both sessions', async () => (await http(b.relay, 'GET', '/health')).body.active_connections === 2);
      const extra = await connect(b.relay);
      extra.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
      assert.equal((await extra.next('error')).code, 'server_full');
      assert.equal((await extra.closed).code, 4013);
      const moved = await reconnect(b.relay, first, 'employee');
      assert.equal(moved.ok.type, 'auth_ok');
      await Promise.all([moved.socket.close(), second.socket.close()]);
    } finally {
      await cluster.dispose();
    }
  });

  test('--max-connections holds when the last place was taken on another node a moment ago (before this node heard of it)', async () => {
    const cluster = await startCluster(2, { maxConnections: 2 });
    try {
      const [a, b] = cluster.nodes as [TestRelay, TestRelay];
      const first = await authEmployee(a.relay, 'One', ['ops']);
      await eventually('node-1 counts the first session', async () => (await http(b.relay, 'GET', '/health')).body.active_connections === 1);
      // A session whose announcement has not reached node-1 yet: in Redis's presence only.
      await redis.client.hset(`${cluster.name}:presence`, 'employee-elsewhere', 'node-0');
      const extra = await connect(b.relay);
      extra.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
      const refused = await extra.next('error');
      assert.equal(refused.code, 'server_full');
      assert.match(String(refused.message), /limit of 2 connections/);
      assert.equal((await extra.closed).code, 4013);
      assert.equal(await redis.client.hlen(`${cluster.name}:presence`), 2, 'the refused session left no presence');
      // A reconnect of an identity online elsewhere replaces it: still let in.
      const moved = await reconnect(b.relay, first, 'employee');
      assert.equal(moved.ok.type, 'auth_ok');
      await moved.socket.close();
    } finally {
      await cluster.dispose();
    }
  });
});

describe('cluster: faults', () => {
  test('a killed node: its identities go offline within the bound, and a message to them is never acked as delivered', async () => {
    const name = `t${process.pid}-${clusterSeq++}`;
    const survivor = await startTracked({ redisUrl: redis.url, clusterName: name, nodeId: 'survivor', authkey: CHILD_AUTHKEY });
    const dir = await makeTempDir();
    const doomed = await startChild(dir, ['--redis', redis.url, '--cluster', name, '--node-id', 'doomed']);
    try {
      const employee = await authEmployee(doomed, 'Doomed', ['ops']);
      await presenceIs(name, employee.id, 'doomed');
      doomed.child.child.kill('SIGKILL');
      await doomed.child.exited;
      const boss = await authBoss(survivor.relay, CHILD_AUTHKEY);
      // In flight to a dead node: failed, never delivered.
      boss.socket.send({ type: 'message', to: employee.id, payload: 'anyone?' });
      const ack = await boss.socket.next('delivery_ack', 10_000);
      assert.deepEqual(ack.delivered, []);
      assert.deepEqual(ack.failed, [{ id: employee.id, reason: 'target_offline' }]);
      const killedAt = Date.now();
      await presenceIs(name, employee.id, null);
      assert.ok(Date.now() - killedAt < 15_000);
      assert.equal(await redis.client.sismember(`${name}:nodes`, 'doomed'), 0);
      // Its client reconnects to the surviving node with the same identity.
      const back = await reconnect(survivor.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      doomed.child.child.kill('SIGKILL');
      await survivor.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a node restarted after a kill under the same node id clears the presence its old process left', async () => {
    const name = `t${process.pid}-${clusterSeq++}`;
    const dir = await makeTempDir();
    const args = ['--redis', redis.url, '--cluster', name, '--node-id', 'phoenix'];
    const first = await startChild(dir, args);
    let second: Awaited<ReturnType<typeof startRelayProcess>> | null = null;
    try {
      const employee = await authEmployee(first, 'Orphan', ['ops']);
      await presenceIs(name, employee.id, 'phoenix');
      first.child.child.kill('SIGKILL');
      await first.child.exited;
      // No other node is there to bury the dead one: the restarted node must not inherit it.
      second = await startChild(dir, args);
      assert.equal(await redis.client.hget(`${name}:presence`, employee.id), null);
      const list = (await http(second, 'GET', '/employees')).body.employees as { id: string; online: boolean }[];
      assert.equal(list.find((e) => e.id === employee.id)?.online, false);
    } finally {
      first.child.child.kill('SIGKILL');
      second?.child.child.kill('SIGKILL');
      await second?.child.exited;
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('nodes as separate processes: routing across them, and a SIGTERMed node hands its identities over at once', async () => {
    const name = `t${process.pid}-${clusterSeq++}`;
    const [dirA, dirB] = [await makeTempDir(), await makeTempDir()];
    const a = await startChild(dirA, ['--redis', redis.url, '--cluster', name, '--node-id', 'proc-a']);
    const b = await startChild(dirB, ['--redis', redis.url, '--cluster', name, '--node-id', 'proc-b']);
    try {
      const employee = await authEmployee(a, 'Proc', ['ops']);
      const boss = await authBoss(b, CHILD_AUTHKEY);
      boss.socket.send({ type: 'message', to: employee.id, payload: 'over there', msg_id: 'p-1' });
      assert.equal((await employee.socket.next('message')).payload, 'over there');
      assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [employee.id]);
      a.child.child.kill('SIGTERM');
      assert.equal((await employee.socket.closed).code, 1001);
      assert.equal((await a.child.exited).code, 0);
      // A clean stop removes its presence and its node key itself, without waiting for the bound.
      assert.equal(await redis.client.hget(`${name}:presence`, employee.id), null);
      assert.equal(await redis.client.exists(`${name}:node:proc-a`), 0);
      boss.socket.send({ type: 'message', to: employee.id, payload: 'kept', queue: true, msg_id: 'p-2' });
      assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [employee.id]);
      const back = await reconnect(b, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      assert.equal((await back.socket.next('message')).payload, 'kept');
      await Promise.all([boss.socket.close(), back.socket.close()]);
    } finally {
      a.child.child.kill('SIGKILL');
      b.child.child.kill('SIGKILL');
      await Promise.all([a.child.exited, b.child.exited]);
      await Promise.all([dirA, dirB].map((dir) => fs.rm(dir, { recursive: true, force: true })));
    }
  });

  test('three processes behind a round-robin balancer are one relay; a killed node\'s client gets its queued messages once, in order, on another node', async () => {
    const name = `t${process.pid}-${clusterSeq++}`;
    const dirs = [await makeTempDir(), await makeTempDir(), await makeTempDir()];
    const nodes = await Promise.all(dirs.map((dir, i) => startChild(dir, ['--redis', redis.url, '--cluster', name, '--node-id', `lb-${i}`])));
    const balancer = await startBalancer(nodes.map((node) => ({ host: '127.0.0.1', port: node.child.port })));
    try {
      const employees: Authed[] = [];
      for (const n of [0, 1, 2]) employees.push(await authEmployee(balancer, `W${n}`, ['pool']));
      const boss = await authBoss(balancer, CHILD_AUTHKEY);
      const holders = async () => {
        const list = (await http(balancer, 'GET', '/employees')).body.employees as { id: string; node: string | null }[];
        return employees.map((e) => list.find((entry) => entry.id === e.id)?.node ?? null);
      };
      // Round robin spread the employees over the three nodes.
      assert.deepEqual([...(await holders())].sort(), ['lb-0', 'lb-1', 'lb-2']);
      boss.socket.send({ type: 'message', to: employees.map((e) => e.id), payload: 'all of you', msg_id: 'lb-1' });
      assert.deepEqual([...((await boss.socket.next('delivery_ack')).delivered as string[])].sort(), employees.map((e) => e.id).sort());
      for (const e of employees) assert.equal((await e.socket.next('message')).payload, 'all of you');
      boss.socket.send({ type: 'message', to: 'tag:pool', payload: 'by tag' });
      assert.equal(((await boss.socket.next('delivery_ack')).delivered as string[]).length, 3);
      for (const e of employees) assert.equal((await e.socket.next('message')).payload, 'by tag');

      // Kill the node of an employee that is not on the boss's node.
      const bossNode = ((await http(balancer, 'GET', '/connections')).body.connections as { id: string; node: string | null }[]).find((c) => c.id === boss.id)?.node;
      const where = await holders();
      const victim = where.findIndex((node) => node !== bossNode);
      const doomed = nodes[Number(where[victim]!.slice(3))]!;
      const employee = employees[victim]!;
      doomed.child.child.kill('SIGKILL');
      await doomed.child.exited;
      await employee.socket.closed;
      for (const n of [1, 2, 3]) {
        boss.socket.send({ type: 'message', to: employee.id, payload: { n }, queue: true, msg_id: `kept-${n}` });
        const ack = await boss.socket.next('delivery_ack', 10_000);
        assert.deepEqual(ack.delivered, [], 'never delivered to a dead node');
        assert.deepEqual(ack.queued, [employee.id]);
      }
      // It reconnects through the balancer, which skips the dead node.
      const back = await reconnect(balancer, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      for (const n of [1, 2, 3]) assert.deepEqual((await back.socket.next('message')).payload, { n });
      for (const n of [1, 2, 3]) assert.equal((await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === `kept-${n}`)).status, 'delivered');
      // Once: the next message it gets is a new one.
      boss.socket.send({ type: 'message', to: employee.id, payload: 'after' });
      assert.equal((await back.socket.next('message')).payload, 'after');
      await Promise.all([boss.socket.close(), back.socket.close(), ...employees.filter((e) => e !== employee).map((e) => e.socket.close())]);
    } finally {
      await balancer.close();
      for (const node of nodes) node.child.child.kill('SIGKILL');
      await Promise.all(nodes.map((node) => node.child.exited));
      await Promise.all(dirs.map((dir) => fs.rm(dir, { recursive: true, force: true })));
    }
  });

  test('Redis lost mid-route: targets on the sender\'s node keep their delivery, the ack comes and fails the other node\'s target', async () => {
    const durable = await startRedis();
    leftovers.redises.push(durable);
    const name = `t${process.pid}-${clusterSeq++}`;
    const a = await startTracked({ redisUrl: durable.url, clusterName: name, nodeId: 'a' });
    const dirB = await makeTempDir();
    const b = await startChild(dirB, ['--redis', durable.url, '--cluster', name, '--node-id', 'b']);
    try {
      const near = await authEmployee(a.relay, 'Near', ['ops']);
      const far = await authEmployee(b, 'Far', ['ops']);
      const boss = await authBoss(a.relay);
      await eventually('node a routes to node b', async () => {
        boss.socket.send({ type: 'message', to: far.id, payload: 'warm-up' });
        return ((await boss.socket.next('delivery_ack')).delivered as string[]).includes(far.id);
      });
      // Node b does not answer (stopped), and Redis goes away while node a waits for it.
      b.child.child.kill('SIGSTOP');
      boss.socket.send({ type: 'message', to: [near.id, far.id], payload: 'both', queue: true, msg_id: 'mid-route' });
      assert.equal((await near.socket.next('message')).msg_id, 'mid-route');
      await durable.kill();
      const answer = await boss.socket.next((f) => f.msg_id === 'mid-route', 15_000);
      assert.equal(answer.type, 'delivery_ack', `a true ack, not ${String(answer.code)}: ${near.id} has the message already`);
      assert.deepEqual(answer.delivered, [near.id]);
      assert.deepEqual(answer.queued, []);
      assert.deepEqual(answer.failed, [{ id: far.id, reason: 'target_offline' }]);
      await Promise.all([boss.socket.close(), near.socket.close()]);
    } finally {
      b.child.child.kill('SIGKILL');
      await b.child.exited;
      await a.dispose();
      await durable.stop();
      await fs.rm(dirB, { recursive: true, force: true });
    }
  });

  test('Redis unreachable at start: one clear line and a non-zero exit, not a hang', async () => {
    const deadPort = await freePort();
    const dir = await makeTempDir();
    const port = await freePort();
    const child = spawn(process.execPath, [CLI, String(port), 'secret', dir, '--host', '127.0.0.1', '--redis', `redis://127.0.0.1:${deadPort}`], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const code = await new Promise<number | null>((resolve) => child.once('exit', (exitCode) => resolve(exitCode)));
    assert.notEqual(code, 0);
    const lines = stderr.trim().split('\n');
    assert.equal(lines.length, 1, stderr);
    assert.match(lines[0]!, new RegExp(`Cannot reach Redis at redis://127\\.0\\.0\\.1:${deadPort}`));
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('Redis restarts with appendonly: nodes re-sync by themselves and route across again', async () => {
    const durable = await startRedis({ appendonly: true });
    leftovers.redises.push(durable);
    const name = `restart-${process.pid}`;
    const a = await startTracked({ redisUrl: durable.url, clusterName: name, nodeId: 'a' });
    const b = await startTracked({ redisUrl: durable.url, clusterName: name, nodeId: 'b' });
    let client: RelayClient | null = null;
    try {
      const employee = await authEmployee(a.relay, 'Steady', ['ops']);
      const boss = await authBoss(b.relay);
      client = new RelayClient({ url: b.relay.url, role: 'boss', authkey: TEST_AUTHKEY, heartbeatIntervalMs: 0 });
      await client.connect();
      await durableHas(durable, `${name}:presence`, employee.id, 'a');
      await durable.kill();
      // While Redis is away, what needs it answers with a retryable code.
      boss.socket.send({ type: 'message', to: employee.id, payload: 'now?', msg_id: 'while-down' });
      const refused = await boss.socket.next('error', 10_000);
      assert.equal(refused.code, 'cluster_unavailable');
      assert.deepEqual((await http(b.relay, 'GET', '/health')).body.cluster, { name, store: 'down', node_connections: 2 });
      // A delete or key rotation that could not reach every node changes nothing, and says so.
      for (const [method, route] of [['DELETE', `/api/identities/${employee.id}`], ['POST', `/api/identities/${employee.id}/rotate-key`]] as const) {
        const answer = await http(b.relay, method, route, { authkey: TEST_AUTHKEY });
        assert.deepEqual([answer.status, answer.body.code], [503, 'cluster_unavailable'], `${method} ${route}`);
      }
      assert.equal(refused.msg_id, 'while-down');
      // RelayClient takes that code as "retry": its send is acked once Redis is back.
      const clientAck = client.send(employee.id, 'from the client');
      clientAck.catch(() => undefined); // awaited below, after the restart
      await durable.restart();
      assert.deepEqual((await clientAck).delivered, [employee.id]);
      assert.equal((await employee.socket.next((f) => f.type === 'message' && f.payload === 'from the client')).from_id, client.identity?.id);
      await eventually('the cluster routes again', async () => {
        boss.socket.send({ type: 'message', to: employee.id, payload: 'again' });
        const answer = await boss.socket.next((f) => f.type === 'delivery_ack' || f.type === 'error', 10_000);
        return answer.type === 'delivery_ack' && (answer.delivered as string[]).includes(employee.id);
      }, 20_000);
      assert.equal((await employee.socket.next((f) => f.type === 'message' && f.payload === 'again')).payload, 'again');
      await Promise.all([boss.socket.close(), employee.socket.close()]);
      // The refused key rotation left the key as it was, on the node asked too.
      const back = await reconnect(b.relay, employee, 'employee');
      assert.equal(back.ok.type, 'auth_ok', JSON.stringify(back.ok));
      await back.socket.close();
    } finally {
      await client?.close();
      await a.dispose();
      await b.dispose();
      await durable.stop();
    }
  });
});

/** A start that must be refused; a relay that starts anyway is closed (so a failing test ends) and fails the test. */
async function startRefused(options: Partial<RelayOptions>, dataDir?: string): Promise<Error> {
  const outcome = await startTestRelay(options, dataDir).then(
    (started) => started,
    (error: Error) => error,
  );
  if (outcome instanceof Error) return outcome;
  await outcome.dispose();
  return assert.fail('the relay started; it should have been refused');
}

async function durableHas(server: TestRedis, key: string, field: string, value: string): Promise<void> {
  await eventually(`${key}[${field}] = ${value}`, async () => (await server.client.hget(key, field)) === value);
}
