// Cluster mode: identity writes never go back in time (docs/CLUSTER.md, "Identities: revisions
// and liveness"). An identity's old session ends on one node while its reconnect on another
// changes its name and tags; the old node's writes and announcements may reach Redis and the
// other nodes after the change. These tests make them late on purpose, by replaying what the
// old node sent, and check that the newer name and tags (and the later times) stay everywhere.

import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import type { RelayOptions } from '../server';
import { eventually } from './fault-support';
import { startRedis, type TestRedis } from './redis-harness';
import { authEmployee, http, reconnect, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';

let redis: TestRedis;
let clusterSeq = 0;
const started: TestRelay[] = [];

before(async () => {
  redis = await startRedis();
});

after(async () => {
  await redis.stop();
});

afterEach(async () => {
  for (const relay of started.splice(0)) await relay.dispose().catch(() => undefined);
});

async function startNode(name: string, nodeId: string, overrides: Partial<RelayOptions> = {}): Promise<TestRelay> {
  const relay = await startTestRelay({ redisUrl: redis.url, clusterName: name, nodeId, ...overrides });
  started.push(relay);
  return relay;
}

async function startCluster(count: number): Promise<{ name: string; nodes: TestRelay[] }> {
  const name = `ti${process.pid}-${clusterSeq++}`;
  const nodes: TestRelay[] = [];
  for (let i = 0; i < count; i++) nodes.push(await startNode(name, `node-${i}`));
  return { name, nodes };
}

interface EmployeeView {
  id: string;
  name: string | null;
  tags: string[];
  banned: boolean;
  health: { connection: { last_connected_at: number | null; last_disconnected_at: number | null } };
}

async function employeeOn(node: TestRelay, id: string): Promise<EmployeeView | undefined> {
  const employees = (await http(node.relay, 'GET', '/admin/workforce')).body.employees as EmployeeView[];
  return employees.find((e) => e.id === id);
}

/**
 * Waits until every node has acted on the control announcements published before this call: a
 * ban from each node in turn, each seen by the others (announcements reach a node in the order
 * Redis took them).
 */
async function settled(nodes: TestRelay[]): Promise<void> {
  const [first] = nodes as [TestRelay];
  const marker = await authEmployee(first.relay, 'Marker', ['marker']);
  await marker.socket.close();
  for (const [index, node] of nodes.entries()) {
    const banned = index % 2 === 0;
    assert.equal((await http(node.relay, banned ? 'POST' : 'DELETE', `/employees/${marker.id}/ban`, { authkey: TEST_AUTHKEY })).status, 200);
    for (const other of nodes) if (other !== node) await eventually(`${other.relay.nodeId} knows the ban change`, async () => (await employeeOn(other, marker.id))?.banned === banned);
  }
}

/** MONITOR shows each argument escaped (ioredis already turned \\" back into "): the argument as sent. */
function unescapeMonitored(arg: string): string {
  const named: Record<string, string> = { n: '\n', r: '\r', t: '\t', a: '\x07', b: '\b', '\\': '\\' };
  return arg.replace(/\\(x[0-9a-f]{2}|[nrtab\\])/g, (_match, code: string) => (code.startsWith('x') ? String.fromCharCode(parseInt(code.slice(1), 16)) : named[code]!));
}

const hasDisconnectTime = (text: string) => /"lastDisconnectedAt":\d/.test(text);

describe('cluster: identity writes never go back in time', () => {
  test("late announcements of the old node's writes take no node back to the old name and tags", async () => {
    const { name, nodes } = await startCluster(2);
    const [a, b] = nodes as [TestRelay, TestRelay];
    const control = redis.client.duplicate();
    try {
      const heard: string[] = [];
      control.on('message', (_channel: string, text: string) => heard.push(text));
      await control.subscribe(`${name}:control`);
      const first = await authEmployee(a.relay, 'Old', ['one']);
      // What node-0 announced about the identity: its creation, its connect and its disconnect.
      const fromOldNode = () =>
        heard.filter((text) => {
          const message = JSON.parse(text) as Record<string, unknown>;
          return message.node === 'node-0' && String(message.t).startsWith('identity') && text.includes(first.id);
        });
      await first.socket.close();
      await eventually('node-0 announced the disconnect', () => fromOldNode().some(hasDisconnectTime));
      const again = await reconnect(b.relay, first, 'employee', { name: 'New', tags: ['two', 'three'] });
      assert.equal(again.ok.type, 'auth_ok');
      assert.equal(again.ok.name, 'New');
      await eventually('node-0 took in the new name', async () => (await employeeOn(a, first.id))?.name === 'New');
      // node-0's announcements reach the nodes once more, late: after the change on node-1.
      for (const text of fromOldNode()) await redis.client.publish(`${name}:control`, text);
      await settled(nodes);
      for (const node of nodes) {
        const seen = await employeeOn(node, first.id);
        assert.equal(seen?.name, 'New', `${node.relay.nodeId} keeps the new name`);
        assert.deepEqual(seen?.tags, ['two', 'three'], `${node.relay.nodeId} keeps the new tags`);
        const tagged = (await http(node.relay, 'GET', '/admin/workforce?tag=one')).body.employees as EmployeeView[];
        assert.equal(tagged.some((e) => e.id === first.id), false, `${node.relay.nodeId} no longer lists it under its old tag`);
      }
      await again.socket.close();
    } finally {
      control.disconnect();
    }
  });

  test("the old node's disconnect written to Redis after the reconnect's change keeps the new name, tags and times", async () => {
    const { name, nodes } = await startCluster(2);
    const [a, b] = nodes as [TestRelay, TestRelay];
    const monitor = await redis.client.monitor();
    try {
      const first = await authEmployee(a.relay, 'Old', ['one']);
      // Every command a node (not a script inside Redis) sent that writes the identity or announces it.
      const writes: string[][] = [];
      const identitiesKey = `${name}:identities`;
      monitor.on('monitor', (_time: string, args: string[], source: string) => {
        if (source === 'lua' || !args.some((arg) => arg.includes(first.id))) return;
        const command = String(args[0]).toLowerCase();
        const writesIdentity =
          (command === 'hset' && args[1] === identitiesKey) ||
          ((command === 'eval' || command === 'evalsha') && args.includes(identitiesKey)) ||
          (command === 'publish' && String(args[2]).includes('"t":"identity'));
        if (writesIdentity) writes.push(args.map(unescapeMonitored));
      });
      await first.socket.close();
      await eventually('node-0 wrote the disconnect', () => writes.some((args) => args.some(hasDisconnectTime)));
      const oldNodeWrites = writes.splice(0);
      const again = await reconnect(b.relay, first, 'employee', { name: 'New', tags: ['two', 'three'] });
      assert.equal(again.ok.name, 'New');
      const connectedAt = async () => (await employeeOn(b, first.id))?.health.connection.last_connected_at ?? null;
      await eventually('node-0 took in the reconnect', async () => {
        const seen = await employeeOn(a, first.id);
        return seen?.name === 'New' && seen.health.connection.last_connected_at === (await connectedAt());
      });
      const reconnectedAt = await connectedAt();
      // node-0's disconnect reaches Redis once more, now after the reconnect's change.
      for (const [command, ...args] of oldNodeWrites) await redis.client.call(command!, ...args);
      const stored = JSON.parse((await redis.client.hget(identitiesKey, first.id)) ?? '{}') as { name?: string; tags?: string[] };
      assert.equal(stored.name, 'New', 'Redis keeps the new name');
      assert.deepEqual(stored.tags, ['two', 'three'], 'Redis keeps the new tags');
      // A node started now reads the identity from Redis alone.
      const fresh = await startNode(name, 'node-2');
      const read = await employeeOn(fresh, first.id);
      assert.equal(read?.name, 'New');
      assert.deepEqual(read?.tags, ['two', 'three']);
      assert.equal(read?.health.connection.last_connected_at, reconnectedAt, 'the reconnect time is not taken back');
      assert.ok((read?.health.connection.last_disconnected_at ?? 0) > 0, 'the disconnect time is kept');
      await again.socket.close();
    } finally {
      monitor.disconnect();
    }
  });
  test('a document without a revision, as migrate writes it, counts as revision 0: a change written over it reaches every node', async () => {
    const { name, nodes } = await startCluster(2);
    const [a, b] = nodes as [TestRelay, TestRelay];
    const first = await authEmployee(a.relay, 'Old', ['one']);
    await first.socket.close();
    await eventually('node-1 knows the employee', async () => (await employeeOn(b, first.id))?.name === 'Old');
    // Written over as `migrate --overwrite` writes it: the document without a revision.
    const identitiesKey = `${name}:identities`;
    const { revision: _revision, ...migrated } = JSON.parse((await redis.client.hget(identitiesKey, first.id))!) as Record<string, unknown>;
    await redis.client.hset(identitiesKey, first.id, JSON.stringify({ ...migrated, tags: ['migrated'] }));
    const again = await reconnect(b.relay, first, 'employee', { name: 'New', tags: ['two'] });
    assert.equal(again.ok.name, 'New');
    for (const node of nodes) await eventually(`${node.relay.nodeId} took in the change`, async () => (await employeeOn(node, first.id))?.name === 'New');
    assert.equal(JSON.parse((await redis.client.hget(identitiesKey, first.id))!).name, 'New');
    await again.socket.close();
  });
});
