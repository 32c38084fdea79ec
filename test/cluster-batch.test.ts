// The cluster's message path to Redis (lib/redis-batch.ts): what one event-loop turn gives goes
// as one script call, so a burst across nodes costs far fewer Redis commands than messages, and
// still arrives in order with true acks. Runs on a redis-server of its own, so the command counts
// are this file's alone.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type Redis from 'ioredis';
import { createLogger } from '../lib/logger';
import { RedisBatch } from '../lib/redis-batch';
import { decodeInbox, encodeInboxRequest } from '../lib/redis-inbox';
import { eventually } from './fault-support';
import { startRedis, type TestRedis } from './redis-harness';
import { authBoss, authEmployee, startTestRelay, type TestRelay } from './support';

let redis: TestRedis;
let seq = 0;

before(async () => {
  redis = await startRedis();
});

after(async () => {
  await redis.stop();
});

/** Counts the commands clients send to Redis (not those a script runs) while `body` runs. */
async function countCommands(body: () => Promise<void>): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  const marker = `end-of-count-${seq++}`;
  let ended = false;
  const monitor = (await redis.client.monitor()) as unknown as Redis & { on(event: 'monitor', listener: (time: string, args: string[], source: string) => void): void };
  monitor.on('monitor', (_time: string, args: string[], source: string) => {
    if (source === 'lua' || ended) return;
    const name = String(args[0]).toLowerCase();
    if (name === 'echo' && args[1] === marker) ended = true;
    else counts.set(name, (counts.get(name) ?? 0) + 1);
  });
  try {
    await body();
    // MONITOR lines may trail the answers: everything before the marker has been counted once it shows.
    await redis.client.echo(marker);
    await eventually('the monitor has seen every command', () => Promise.resolve(ended));
  } finally {
    monitor.disconnect();
  }
  return counts;
}

describe('cluster: the message path to Redis is batched', () => {
  test('one turn: claims, outcomes, deletes and publications in one call, each answered; items to one channel arrive as one message', async () => {
    const connection = redis.client.duplicate();
    const listener = redis.client.duplicate();
    try {
      const prefix = `b${process.pid}-${seq++}:`;
      const received: string[] = [];
      await listener.subscribe(`${prefix}inbox:x`);
      listener.on('message', (_channel: string, message: string) => received.push(message));
      const batch = new RedisBatch(connection, createLogger('silent'));
      await connection.set(`${prefix}taken`, 'first ack', 'PX', 60_000);

      const heard: number[] = [];
      const counts = await countCommands(async () => {
        const [fresh, taken] = await Promise.all([
          batch.claim(`${prefix}fresh`, 60_000),
          batch.claim(`${prefix}taken`, 60_000),
          new Promise<void>((resolve) => {
            batch.publish(`${prefix}inbox:x`, '{"n":1}', (receivers) => heard.push(receivers));
            batch.publish(`${prefix}inbox:x`, '{"n":2}', (receivers) => {
              heard.push(receivers);
              resolve();
            });
            batch.publish(`${prefix}inbox:nobody`, '{"n":3}', (receivers) => heard.push(receivers));
          }),
        ]);
        assert.equal(fresh, null, 'a free key is claimed');
        assert.equal(taken, 'first ack', 'a taken key answers what it holds');
        // A claim's outcome replaces "pending" and keeps the window; a claim given back is gone.
        batch.settle(`${prefix}fresh`, 'its outcome', 'test_failed');
        batch.delete(`${prefix}taken`, 'test_failed');
        assert.equal(await batch.claim(`${prefix}fresh`, 60_000), 'its outcome');
      });
      assert.equal(await connection.get(`${prefix}taken`), null);
      assert.ok((await connection.pttl(`${prefix}fresh`)) > 0, 'the settled key keeps its expiry');
      // Two turns, one script call each (an EVAL too the first time Redis has not seen the script), nothing else.
      const sent = JSON.stringify([...counts]);
      assert.deepEqual([...counts.keys()].filter((command) => command !== 'evalsha' && command !== 'eval'), [], `commands sent: ${sent}`);
      assert.equal((counts.get('evalsha') ?? 0) + (counts.get('eval') ?? 0), 2, `commands sent: ${sent}`);
      assert.deepEqual(heard, [1, 1, 0]);
      await eventually('the publication arrives', () => Promise.resolve(received.length > 0));
      assert.deepEqual(received, ['[{"n":1},{"n":2}]']);
    } finally {
      connection.disconnect();
      listener.disconnect();
    }
  });

  test('keys, values and items that are not ASCII arrive whole', async () => {
    const connection = redis.client.duplicate();
    const listener = redis.client.duplicate();
    try {
      const prefix = `b${process.pid}-${seq++}:`;
      const received: string[] = [];
      await listener.subscribe(`${prefix}inbox:ü`);
      listener.on('message', (_channel: string, message: string) => received.push(message));
      const batch = new RedisBatch(connection, createLogger('silent'));
      const key = `${prefix}dedupe:boss-1:msg:ü✓🚀:12`;
      assert.equal(await batch.claim(key, 60_000), null);
      batch.settle(key, '"delivered":["émployé:1"],"failed":[]', 'test_failed');
      batch.publish(`${prefix}inbox:ü`, JSON.stringify({ head: '{"to":"', tail: '","payload":"→ 3:x 🚀"}' }), () => undefined);
      assert.equal(await batch.claim(key, 60_000), '"delivered":["émployé:1"],"failed":[]');
      await eventually('the publication arrives', () => Promise.resolve(received.length > 0));
      assert.deepEqual(JSON.parse(received[0]!), [{ head: '{"to":"', tail: '","payload":"→ 3:x 🚀"}' }]);
    } finally {
      connection.disconnect();
      listener.disconnect();
    }
  });

  test('inbox requests carry their frame pieces raw: several in one publication arrive whole and in order, whatever they hold', async () => {
    const connection = redis.client.duplicate();
    const listener = redis.client.duplicate();
    try {
      const prefix = `b${process.pid}-${seq++}:`;
      const received: string[] = [];
      await listener.subscribe(`${prefix}inbox:n`);
      listener.on('message', (_channel: string, message: string) => received.push(message));
      const batch = new RedisBatch(connection, createLogger('silent'));
      // Pieces that look like framing (a JSON line, lengths, newlines escaped) and characters outside ASCII and the BMP.
      const first = { head: '{"type":"message","msg_id":"ü\\n{\\"h\\":3}","to":"', tail: '","payload":"→ 🚀\\n{}\\n","timestamp":1}' };
      const second = { head: '{"to":"', tail: '"}', queueable: true };
      batch.publish(`${prefix}inbox:n`, encodeInboxRequest({ t: 'deliver', req: 'a:1', ids: ['é'] }, first), () => undefined, true);
      batch.publish(`${prefix}inbox:n`, encodeInboxRequest({ t: 'query', req: 'a:2', kind: 'k', query: { x: '\n' } }, null), () => undefined, true);
      batch.publish(`${prefix}inbox:n`, encodeInboxRequest({ t: 'broadcast', req: 'a:3', queueable: true }, second), () => undefined, true);
      await eventually('the publication arrives', () => Promise.resolve(received.length > 0));
      assert.equal(received.length, 1, 'one publication for the turn');
      const broken: string[] = [];
      const requests = decodeInbox(received[0]!, (why) => broken.push(why));
      assert.deepEqual(broken, []);
      assert.deepEqual(
        requests.map((request) => [request.meta.req, request.pieces]),
        [
          ['a:1', first],
          ['a:2', null],
          ['a:3', second],
        ],
      );
      assert.deepEqual(requests[1]!.meta.query, { x: '\n' });
      // A publication cut short or garbled is reported and read no further, never thrown.
      const whole = received[0]!;
      for (const bad of [whole.slice(0, whole.length - 1), `x${whole}`, whole.replace('"h":', '"h":-')]) {
        const why: string[] = [];
        assert.doesNotThrow(() => decodeInbox(bad, (reason) => why.push(reason)));
        assert.equal(why.length, 1, `reported: ${bad.slice(0, 40)}`);
      }
    } finally {
      connection.disconnect();
      listener.disconnect();
    }
  });

  test('a Redis that lost the script (restarted, flushed) runs it again: the claim is still answered', async () => {
    const connection = redis.client.duplicate();
    try {
      const prefix = `b${process.pid}-${seq++}:`;
      const batch = new RedisBatch(connection, createLogger('silent'));
      assert.equal(await batch.claim(`${prefix}one`, 60_000), null);
      await redis.client.script('FLUSH');
      assert.equal(await batch.claim(`${prefix}two`, 60_000), null);
      assert.equal(await batch.claim(`${prefix}one`, 60_000), 'pending');
    } finally {
      connection.disconnect();
    }
  });

  test('a burst across nodes: every message delivered once, in send order, acked delivered, with fewer Redis commands than messages', async () => {
    const name = `b${process.pid}-${seq++}`;
    const nodes: TestRelay[] = [];
    try {
      for (let i = 0; i < 2; i++) nodes.push(await startTestRelay({ redisUrl: redis.url, clusterName: name, nodeId: `node-${i}` }));
      const [a, b] = nodes as [TestRelay, TestRelay];
      const employee = await authEmployee(b.relay, 'Far', ['research']);
      const boss = await authBoss(a.relay);
      await eventually('node-0 places the employee', async () => (await redis.client.hget(`${name}:presence`, employee.id)) === 'node-1');
      const count = 400;
      const counts = await countCommands(async () => {
        for (let i = 0; i < count; i++) boss.socket.send({ type: 'message', to: employee.id, payload: { n: i }, msg_id: `burst-${i}` });
        for (let i = 0; i < count; i++) {
          const got = await employee.socket.next('message');
          assert.deepEqual(got.payload, { n: i }, 'messages arrive in send order');
        }
        const acked = new Set<string>();
        for (let i = 0; i < count; i++) {
          const ack = await boss.socket.next('delivery_ack');
          assert.deepEqual(ack.delivered, [employee.id]);
          acked.add(String(ack.msg_id));
        }
        assert.equal(acked.size, count);
      });
      const total = [...counts.values()].reduce((sum, n) => sum + n, 0);
      // One command per claim, request, answer and outcome would be 4 per message.
      assert.ok(total < count, `${total} Redis commands for ${count} messages: ${JSON.stringify([...counts])}`);
      // Every ack's outcome is recorded for the dedupe window (a resend anywhere is answered, not routed).
      await eventually('every outcome is recorded', async () => {
        const values = await redis.client.mget(Array.from({ length: count }, (_, i) => `${name}:dedupe:${boss.id}:burst-${i}`));
        return values.every((value) => value !== null && value !== 'pending');
      });
      await Promise.all([boss.socket.close(), employee.socket.close()]);
    } finally {
      for (const node of nodes) await node.dispose();
    }
  });
});
