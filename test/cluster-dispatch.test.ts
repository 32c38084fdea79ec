// Dispatch (`any:<tag>`, PROTOCOL.md part C) across the nodes of a cluster (docs/CLUSTER.md
// "Dispatch"): in-process nodes on one real redis-server, plus a child-process node where a node
// must be killed. The boss and the employees sit on different nodes on purpose.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { REAP_SCRIPT } from '../lib/redis-dispatch-scripts';
import type { RelayOptions } from '../server';
import { CHILD_AUTHKEY, eventually, startRelayProcess } from './fault-support';
import { useClusterFixture } from './cluster-fixture';
import { startRedis, type TestRedis } from './redis-harness';
import { authBoss, authEmployee, http, makeTempDir, startTestRelay, type Authed, type Frame, type TestRelay } from './support';

let redis: TestRedis;
let clusterSeq = 0;

const leftovers = useClusterFixture((started) => {
  redis = started;
});

async function startNode(options: Partial<RelayOptions>): Promise<TestRelay> {
  const started = await startTestRelay(options);
  leftovers.relays.push(started);
  return started;
}

/** `count` nodes of a fresh cluster (its own key prefix) on the test's Redis. */
async function startCluster(count: number, overrides: Partial<RelayOptions> = {}): Promise<{ nodes: TestRelay[]; name: string }> {
  const name = `d${process.pid}-${clusterSeq++}`;
  const nodes: TestRelay[] = [];
  for (let i = 0; i < count; i++) nodes.push(await startNode({ redisUrl: redis.url, clusterName: name, nodeId: `node-${i}`, ...overrides }));
  return { nodes, name };
}

/** Waits until the shared store lists the employee as available on `node` (written just after auth_ok). */
async function availableOn(server: TestRedis, name: string, who: Authed, node: string): Promise<void> {
  await eventually(`${who.id} available on ${node}`, async () => (await server.client.hget(`${name}:dispatch:emp:${who.id}`, 'node')) === node);
}

/** How the last version of a message's record in a node's messages.db settled a queued target, if it did. */
async function settledIn(node: TestRelay, msgId: string, target: string): Promise<string | undefined> {
  const lines = (await fs.readFile(path.join(node.dataDir, 'messages.db'), 'utf8')).split('\n').filter((line) => line.includes(`"msg_id":${JSON.stringify(msgId)}`));
  const last = lines.length > 0 ? (JSON.parse(lines[lines.length - 1]!) as { settled?: Record<string, string> }) : undefined;
  return last?.settled?.[target];
}

const update = (msgId: string, status: string, attempt?: number) => (f: Frame) =>
  f.type === 'delivery_update' && f.msg_id === msgId && f.status === status && (attempt === undefined || f.attempt === attempt);

describe('cluster dispatch', () => {
  test('a task from a boss on one node goes to an employee on another; the reply, assigned and done reach the boss; admin reads on a third node see it', async () => {
    const { nodes, name } = await startCluster(3);
    const [one, two, three] = nodes.map((node) => node.relay) as [TestRelay['relay'], TestRelay['relay'], TestRelay['relay']];
    const boss = await authBoss(one);
    const worker = await authEmployee(two, 'Researcher', ['research']);
    const other = await authEmployee(three, 'Billing', ['billing']);
    await availableOn(redis, name, worker, 'node-1');
    await availableOn(redis, name, other, 'node-2');

    boss.socket.send({ type: 'message', to: 'any:research', payload: { q: 1 }, msg_id: 'r1', task_timeout_ms: 60_000 });
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual([ack.delivered, ack.queued, ack.failed], [[worker.id], [], []]);
    const task = await worker.socket.next('message');
    assert.deepEqual([task.msg_id, task.to, task.dispatch, task.attempt, task.from_id], ['r1', worker.id, 'any:research', 1, boss.id]);
    assert.deepEqual(task.payload, { q: 1 });
    const assigned = await boss.socket.next(update('r1', 'assigned'));
    assert.deepEqual([assigned.id, assigned.dispatch, assigned.attempt], [worker.id, 'any:research', 1]);

    // Node three holds neither the boss, the employee nor the task: it answers for the cluster.
    const { body: tasks } = await http(three, 'GET', '/api/admin/tasks');
    assert.deepEqual(tasks.tags, { research: { waiting: 0, in_progress: 1 } });
    const listed = (tasks.tasks as Record<string, unknown>[]).map((t) => [t.msg_id, t.status, t.employee_id, t.attempt, t.target, t.from_id]);
    assert.deepEqual(listed, [['r1', 'in_progress', worker.id, 1, 'any:research', boss.id]]);
    const { body: force } = await http(three, 'GET', '/api/admin/workforce');
    const employees = force.employees as Record<string, unknown>[];
    assert.deepEqual(employees.find((e) => e.id === worker.id)!.dispatch, { status: 'idle', capacity: 1, in_progress: 1 });
    assert.deepEqual(employees.find((e) => e.id === other.id)!.dispatch, { status: 'idle', capacity: 1, in_progress: 0 });

    worker.socket.send({ type: 'message', to: boss.id, in_reply_to: 'r1', payload: { answer: 42 } });
    const reply = await boss.socket.next((f) => f.type === 'message' && f.in_reply_to === 'r1');
    assert.deepEqual(reply.payload, { answer: 42 });
    const done = await boss.socket.next(update('r1', 'done'));
    assert.deepEqual([done.id, done.dispatch], [worker.id, 'any:research']);
    // The reply ended the lease: the task is gone, a task_done for it is refused.
    worker.socket.send({ type: 'task_done', msg_id: 'r1' });
    assert.equal((await worker.socket.next('error')).code, 'task_not_found');
    await eventually('the task is gone cluster-wide', async () => ((await http(three, 'GET', '/api/admin/tasks')).body.tasks as unknown[]).length === 0);
    assert.equal(other.socket.frames.filter((f) => f.type === 'message').length, 0);
  });

  test('fairness across nodes: two employees with capacity 2 on different nodes get the tasks by fewest in progress; then nobody is free', async () => {
    const { nodes, name } = await startCluster(3);
    const boss = await authBoss(nodes[0]!.relay);
    const a = await authEmployee(nodes[1]!.relay, 'A', ['fair'], { capacity: 2 });
    const b = await authEmployee(nodes[2]!.relay, 'B', ['fair'], { capacity: 2 });
    await availableOn(redis, name, a, 'node-1');
    await availableOn(redis, name, b, 'node-2');
    const counts: Record<string, number> = { [a.id]: 0, [b.id]: 0 };
    for (let i = 1; i <= 4; i++) {
      boss.socket.send({ type: 'message', to: 'any:fair', payload: i, msg_id: `f${i}`, task_timeout_ms: 60_000 });
      const ack = await boss.socket.next('delivery_ack');
      const [chosen] = ack.delivered as string[];
      assert.ok(chosen === a.id || chosen === b.id, `f${i} went to an employee`);
      counts[chosen!]!++;
      // Fewest in progress first: after every task the two differ by at most one.
      assert.ok(Math.abs(counts[a.id]! - counts[b.id]!) <= 1, `after f${i}: ${JSON.stringify(counts)}`);
    }
    assert.deepEqual(counts, { [a.id]: 2, [b.id]: 2 });
    const received = await Promise.all([a.socket.next('message'), a.socket.next('message'), b.socket.next('message'), b.socket.next('message')]);
    assert.equal(new Set(received.map((f) => f.msg_id)).size, 4);
    boss.socket.send({ type: 'message', to: 'any:fair', payload: 5, msg_id: 'f5' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'any:fair', reason: 'no_available_target' }]);
    // One finishes: the next task goes to it.
    a.socket.send({ type: 'task_done', msg_id: received[0]!.msg_id });
    await boss.socket.next(update(String(received[0]!.msg_id), 'done'));
    boss.socket.send({ type: 'message', to: 'any:fair', payload: 6, msg_id: 'f6' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
    assert.equal((await a.socket.next('message')).msg_id, 'f6');
  });

  test('a task queued on one node goes to the first employee free on another, with its record settled and assigned sent to the boss', async () => {
    const { nodes, name } = await startCluster(3);
    const boss = await authBoss(nodes[0]!.relay);
    boss.socket.send({ type: 'message', to: 'any:later', payload: 'wait', msg_id: 'q1', queue: true, priority: 'low' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:later']);
    boss.socket.send({ type: 'message', to: 'any:later', payload: 'first', msg_id: 'q2', queue: true, priority: 'high' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:later']);
    const { body } = await http(nodes[1]!.relay, 'GET', '/api/admin/tasks');
    assert.deepEqual(body.tags, { later: { waiting: 2, in_progress: 0 } });
    const worker = await authEmployee(nodes[2]!.relay, 'Late', ['later']);
    await availableOn(redis, name, worker, 'node-2');
    const first = await worker.socket.next('message');
    assert.deepEqual([first.msg_id, first.attempt], ['q2', 1]);
    assert.equal((await boss.socket.next(update('q2', 'assigned'))).id, worker.id);
    worker.socket.send({ type: 'task_done', msg_id: 'q2' });
    assert.equal((await worker.socket.next('message')).msg_id, 'q1');
    // The boss's node logged the queued target; the first assignment on another node settled it.
    await eventually('q2 is delivered in the boss node\'s messages.db', async () => (await settledIn(nodes[0]!, 'q2', 'any:later')) === 'delivered');
  });

  test('a queued task past its ttl_ms expires once in the cluster: the boss gets expired, the task leaves /admin/tasks', async () => {
    const { nodes } = await startCluster(3);
    const boss = await authBoss(nodes[0]!.relay);
    boss.socket.send({ type: 'message', to: 'any:gone', payload: 'x', msg_id: 'e1', queue: true, ttl_ms: 300 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:gone']);
    // A later one, so that several sweeps of every node run before the test looks again.
    boss.socket.send({ type: 'message', to: 'any:gone', payload: 'y', msg_id: 'e2', queue: true, ttl_ms: 2500 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:gone']);
    const expired = await boss.socket.next(update('e1', 'expired'), 10_000);
    assert.deepEqual([expired.id, expired.dispatch], ['any:gone', 'any:gone']);
    await boss.socket.next(update('e2', 'expired'), 10_000);
    // Each node sweeps, but a task expires once: no second update.
    assert.equal(boss.socket.frames.filter(update('e1', 'expired')).length, 0);
    const { body } = await http(nodes[2]!.relay, 'GET', '/api/admin/tasks');
    assert.deepEqual([body.tags, body.tasks], [{}, []]);
    // The boss's node logged the target as queued; the expiry settled it there, whichever node swept it.
    await eventually('e1 is expired in the boss node\'s messages.db', async () => (await settledIn(nodes[0]!, 'e1', 'any:gone')) === 'expired');
  });

  test('an employee that disconnects loses its task to a free employee on another node, with attempt 2', async () => {
    const { nodes, name } = await startCluster(3);
    const boss = await authBoss(nodes[0]!.relay);
    const a = await authEmployee(nodes[1]!.relay, 'A', ['hand']);
    await availableOn(redis, name, a, 'node-1');
    boss.socket.send({ type: 'message', to: 'any:hand', payload: 'p', msg_id: 'h1', task_timeout_ms: 60_000 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
    await a.socket.next('message');
    const b = await authEmployee(nodes[2]!.relay, 'B', ['hand']);
    await availableOn(redis, name, b, 'node-2');
    await a.socket.close();
    const moved = await b.socket.next('message');
    assert.deepEqual([moved.msg_id, moved.attempt], ['h1', 2]);
    assert.equal((await boss.socket.next(update('h1', 'assigned', 2))).id, b.id);
    b.socket.send({ type: 'task_done', msg_id: 'h1' });
    assert.equal((await boss.socket.next(update('h1', 'done'))).id, b.id);
  });
});

describe('cluster dispatch: faults', () => {
  test('a killed node: once found dead, its in-progress task goes to an employee on a surviving node', async () => {
    const name = `d${process.pid}-${clusterSeq++}`;
    const survivor = await startNode({ redisUrl: redis.url, clusterName: name, nodeId: 'survivor', authkey: CHILD_AUTHKEY });
    const dir = await makeTempDir();
    const doomed = await startRelayProcess(dir, ['--redis', redis.url, '--cluster', name, '--node-id', 'doomed']);
    leftovers.children.push(doomed);
    try {
      const boss = await authBoss(survivor.relay, CHILD_AUTHKEY);
      const a = await authEmployee(doomed, 'Doomed', ['ops']);
      await availableOn(redis, name, a, 'doomed');
      // A long lease: only the node's death can hand it on within the test.
      boss.socket.send({ type: 'message', to: 'any:ops', payload: 'job', msg_id: 'k1', task_timeout_ms: 600_000 });
      assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
      await a.socket.next('message');
      await boss.socket.next(update('k1', 'assigned', 1));
      const b = await authEmployee(survivor.relay, 'Survivor', ['ops']);
      await availableOn(redis, name, b, 'survivor');
      doomed.child.child.kill('SIGKILL');
      await doomed.child.exited;
      const moved = await b.socket.next('message', 20_000);
      assert.deepEqual([moved.msg_id, moved.attempt, moved.payload], ['k1', 2, 'job']);
      assert.equal((await boss.socket.next(update('k1', 'assigned', 2))).id, b.id);
      b.socket.send({ type: 'message', to: boss.id, in_reply_to: 'k1', payload: 'done' });
      assert.equal((await boss.socket.next(update('k1', 'done'))).id, b.id);
      assert.equal(await redis.client.hget(`${name}:dispatch:emp:${a.id}`, 'node'), '');
    } finally {
      doomed.child.child.kill('SIGKILL');
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a node reaped while only paused (its key lapsed): its task goes to another node, and it writes its employees back by itself', async () => {
    const { nodes, name } = await startCluster(2);
    const boss = await authBoss(nodes[0]!.relay);
    const a = await authEmployee(nodes[1]!.relay, 'Paused', ['p']);
    await availableOn(redis, name, a, 'node-1');
    boss.socket.send({ type: 'message', to: 'any:p', payload: 'job', msg_id: 'p1', task_timeout_ms: 600_000 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
    await a.socket.next('message');
    // What the other nodes do once node-1's key has lapsed, done here at once (nobody else is
    // free yet, so the script hands nothing out that this test would have to deliver).
    const args = [`${name}:dispatch:`, `${name}:banned`, Date.now(), 3, `${name}:node:`, 'node-1', '1'];
    await redis.client.eval(REAP_SCRIPT, 0, ...args);
    assert.equal(await redis.client.hget(`${name}:dispatch:emp:${a.id}`, 'node'), '');
    const b = await authEmployee(nodes[0]!.relay, 'Other', ['p']);
    const moved = await b.socket.next('message', 10_000);
    assert.deepEqual([moved.msg_id, moved.attempt], ['p1', 2]);
    await availableOn(redis, name, a, 'node-1');
    boss.socket.send({ type: 'message', to: 'any:p', payload: 'next', msg_id: 'p2' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
    assert.equal((await a.socket.next('message')).msg_id, 'p2');
  });

  test('an assignment lost on the way (the node that made it vanished before handing it over) is taken up by the employee\'s node', async () => {
    const { nodes, name } = await startCluster(2);
    const boss = await authBoss(nodes[0]!.relay);
    const a = await authEmployee(nodes[1]!.relay, 'Gone', ['lost']);
    await availableOn(redis, name, a, 'node-1');
    boss.socket.send({ type: 'message', to: 'any:lost', payload: 'job', msg_id: 'l1', task_timeout_ms: 600_000 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
    await a.socket.next('message');
    const b = await authEmployee(nodes[0]!.relay, 'Free', ['lost']);
    await availableOn(redis, name, b, 'node-0');
    // A takes nothing more (its node writes it back after the reap below, dnd included).
    a.socket.send({ type: 'status', status: 'dnd' });
    await a.socket.next('status_ack');
    await eventually('A is dnd in the store', async () => (await redis.client.hget(`${name}:dispatch:emp:${a.id}`, 'status')) === 'dnd');
    // A reaper that reserves B for the task and is gone before it tells node-0: nobody writes it.
    const args = [`${name}:dispatch:`, `${name}:banned`, Date.now(), 3, `${name}:node:`, 'node-1', '1'];
    await redis.client.eval(REAP_SCRIPT, 0, ...args);
    // B's node finds a task in progress with B in the store that never reached it, and writes it.
    const moved = await b.socket.next('message', 40_000);
    assert.deepEqual([moved.msg_id, moved.attempt], ['l1', 2]);
    assert.equal((await boss.socket.next(update('l1', 'assigned', 2))).id, b.id);
    b.socket.send({ type: 'task_done', msg_id: 'l1' });
    assert.equal((await boss.socket.next(update('l1', 'done'))).id, b.id);
    assert.equal(b.socket.frames.filter((f) => f.type === 'message').length, 0, 'written once');
  });

  test('Redis away: a task is refused with cluster_unavailable and nothing crashes; with appendonly the task in progress survives a Redis restart', async () => {
    const durable = await startRedis({ appendonly: true });
    leftovers.redises.push(durable);
    const name = `dr-${process.pid}`;
    const a = await startNode({ redisUrl: durable.url, clusterName: name, nodeId: 'a' });
    const b = await startNode({ redisUrl: durable.url, clusterName: name, nodeId: 'b' });
    const worker = await authEmployee(a.relay, 'Steady', ['ops'], { capacity: 2 });
    const boss = await authBoss(b.relay);
    await availableOn(durable, name, worker, 'a');
    boss.socket.send({ type: 'message', to: 'any:ops', payload: 'before', msg_id: 'before', task_timeout_ms: 600_000 });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [worker.id]);
    await worker.socket.next('message');

    await durable.kill();
    boss.socket.send({ type: 'message', to: 'any:ops', payload: 'now?', msg_id: 'while-down' });
    const refused = await boss.socket.next('error', 10_000);
    assert.deepEqual([refused.code, refused.msg_id], ['cluster_unavailable', 'while-down']);
    // The employee's own node answers its frames meanwhile.
    worker.socket.send({ type: 'status', status: 'working' });
    assert.equal((await worker.socket.next('status_ack')).status, 'working');
    assert.equal((await http(a.relay, 'GET', '/health')).status, 200);

    await durable.restart();
    await eventually('both nodes reach Redis again', async () =>
      (await Promise.all([a, b].map(async (node) => ((await http(node.relay, 'GET', '/health')).body.cluster as { store: string }).store))).every((store) => store === 'up'),
    20_000);
    // The task written before Redis went away is still in progress: the reply ends it.
    worker.socket.send({ type: 'message', to: boss.id, in_reply_to: 'before', payload: 'after' });
    assert.equal((await boss.socket.next(update('before', 'done'), 10_000)).id, worker.id);
    // And dispatch works again (the node wrote its employee's availability back, status included).
    await eventually('a high task is dispatched again', async () => {
      boss.socket.send({ type: 'message', to: 'any:ops', payload: 'again', priority: 'high' });
      const answer = await boss.socket.next((f) => f.type === 'delivery_ack' || f.type === 'error', 10_000);
      return answer.type === 'delivery_ack' && (answer.delivered as string[]).includes(worker.id);
    }, 20_000);
    boss.socket.send({ type: 'message', to: 'any:ops', payload: 'normal' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'any:ops', reason: 'no_available_target' }], 'working takes only high');
  });
});
