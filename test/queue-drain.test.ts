// Draining a queued backlog to a target that comes back: the whole backlog arrives in send order
// past --max-buffered, a newer queued message waits behind it, and a kill -9 mid-drain delivers
// again only the entries written since the last removal batch reached queue.db.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import { test } from 'node:test';
import { DRAIN_BATCH_ENTRIES } from '../lib/router';
import { CHILD_AUTHKEY, eventually, startRelayProcess, type RelayProcess } from './fault-support';
import {
  authBoss,
  authEmployee,
  http,
  makeTempDir,
  reconnect,
  startTestRelay,
  type Authed,
  type Frame,
  type RelayEndpoint,
  type TestSocket,
} from './support';

const PADDING = 'x'.repeat(2000);
const index = (msgId: unknown) => Number(String(msgId).split('-').pop());

async function isOnline(relay: RelayEndpoint, id: string): Promise<boolean> {
  const { body } = await http(relay, 'GET', '/api/employees');
  return (body.employees as { id: string; online: boolean }[]).some((e) => e.id === id && e.online);
}

async function queueDepth(relay: RelayEndpoint): Promise<number> {
  const response = await fetch(`${relay.httpUrl}/metrics`);
  const match = /^mimiclaw_queue_depth (\d+)$/m.exec(await response.text());
  assert.ok(match, 'GET /metrics shows mimiclaw_queue_depth');
  return Number(match[1]);
}

/** Queues `total` ~2 KB messages `<prefix>-<i>` for an offline worker, a window of them in flight. */
async function queueBacklog(boss: Authed, workerId: string, total: number, prefix: string): Promise<void> {
  const window = 200;
  let sent = 0;
  let acked = 0;
  while (acked < total) {
    while (sent < total && sent - acked < window) {
      boss.socket.send({ type: 'message', to: workerId, payload: { i: sent, pad: PADDING }, msg_id: `${prefix}-${sent}`, queue: true });
      sent++;
    }
    const ack = await boss.socket.next('delivery_ack', 15_000);
    assert.deepEqual(ack.queued, [workerId], `ack of ${String(ack.msg_id)} says queued`);
    acked++;
  }
}

/** The msg_ids of the `message` frames a socket has received and not yet taken. */
function takeMessages(socket: TestSocket): string[] {
  const taken: string[] = [];
  for (let i = 0; i < socket.frames.length; ) {
    if (socket.frames[i]!.type === 'message') taken.push(String(socket.frames.splice(i, 1)[0]!.msg_id));
    else i++;
  }
  return taken;
}

test('a backlog larger than --max-buffered drains completely, and a newer queued message waits behind it', async (t) => {
  // 400 entries of ~2 KB against a 64 KiB bound: the drain goes in batches of about 16 entries.
  const env = await startTestRelay({ maxBufferedBytes: 64 * 1024 });
  try {
    const boss = await authBoss(env.relay);
    const worker = await authEmployee(env.relay, 'Backlogged', ['drain']);
    await worker.socket.close();
    await eventually('the employee shows offline', async () => !(await isOnline(env.relay, worker.id)));
    const total = 400;
    await queueBacklog(boss, worker.id, total, 'old');

    const back = await reconnect(env.relay, worker, 'employee');
    assert.equal(back.ok.type, 'auth_ok');
    await back.socket.next('message', 30_000);
    // The backlog is still being written: a new queued message must not overtake it.
    const newFrames: string[] = [];
    boss.socket.ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame;
      if (frame.msg_id === 'new-0') newFrames.push(frame.type);
    });
    boss.socket.send({ type: 'message', to: worker.id, payload: 'newer', msg_id: 'new-0', queue: true });
    const ack = await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'new-0', 30_000);
    assert.deepEqual(ack.failed, []);
    // A message that may not be queued (as every part-A client sends) is written at once: the
    // drain leaves half of the buffer free for it.
    boss.socket.send({ type: 'message', to: worker.id, payload: 'live', msg_id: 'live-0' });
    const liveAck = await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'live-0', 30_000);
    assert.deepEqual([liveAck.delivered, liveAck.failed], [[worker.id], []], 'a live message is delivered at once while the backlog drains');

    const newer = await back.socket.next((f) => f.type === 'message' && f.msg_id === 'new-0', 30_000).catch(() => null);
    const arrived = takeMessages(back.socket);
    if (!arrived.includes('live-0')) await back.socket.next((f) => f.type === 'message' && f.msg_id === 'live-0', 30_000);
    const before = arrived.filter((id) => id !== 'live-0');
    assert.ok(newer, `the newer message arrives (after ${before.length + 1} of ${total} older ones, then nothing)`);
    assert.equal(before.length + 1, total, `the newer message arrives after all ${total} older ones, not after ${before.length + 1}`);
    assert.deepEqual(
      before.map(index),
      Array.from({ length: total - 1 }, (_, i) => i + 1),
      'the backlog arrives whole and in send order',
    );
    await eventually('the queue is empty', async () => (await queueDepth(env.relay)) === 0, 30_000);

    const updates: Frame[] = [];
    await eventually('the sender has a delivery_update for every queued message', () => {
      for (let i = 0; i < boss.socket.frames.length; ) {
        if (boss.socket.frames[i]!.type === 'delivery_update') updates.push(boss.socket.frames.splice(i, 1)[0]!);
        else i++;
      }
      return updates.length >= total + (ack.queued instanceof Array && ack.queued.length > 0 ? 1 : 0);
    }, 30_000);
    assert.ok(updates.every((u) => u.status === 'delivered'));
    assert.deepEqual(updates.slice(0, total).map((u) => u.msg_id), Array.from({ length: total }, (_, i) => `old-${i}`));
    // The sender hears the ack of the newer message before its delivery_update.
    const wasQueued = ack.queued instanceof Array && ack.queued.length > 0;
    t.diagnostic(`the newer message was acked as ${wasQueued ? 'queued behind the backlog' : 'delivered (the backlog had drained)'}`);
    assert.deepEqual(newFrames, wasQueued ? ['delivery_ack', 'delivery_update'] : ['delivery_ack']);
    await Promise.all([back.socket.close(), boss.socket.close()]);
  } finally {
    await env.dispose();
  }
});

test('kill -9 while a backlog drains: after the restart every entry arrives, and at most one removal batch arrives twice', async (t) => {
  const dir = await makeTempDir();
  let relay: RelayProcess | undefined = await startRelayProcess(dir);
  try {
    const boss = await authBoss(relay, CHILD_AUTHKEY);
    const worker = await authEmployee(relay, 'Crashed', ['drain']);
    await worker.socket.close();
    await eventually('the employee shows offline', async () => !(await isOnline(relay!, worker.id)));
    const total = 4000;
    await queueBacklog(boss, worker.id, total, 'crash');
    await boss.socket.close();

    // The employee reads the backlog; the relay is killed once a quarter of it has arrived.
    const first = await reconnect(relay, worker, 'employee');
    assert.equal(first.ok.type, 'auth_ok');
    const killAt = total / 4;
    let seen = 0;
    const killed = relay;
    first.socket.ws.on('message', () => {
      if (++seen === killAt) killed.child.child.kill('SIGKILL');
    });
    await eventually(`${killAt} messages arrive`, () => seen >= killAt, 30_000);
    assert.equal((await relay.child.exited).signal, 'SIGKILL');
    await first.socket.closed;
    const firstIds = takeMessages(first.socket).map(index);

    relay = await startRelayProcess(dir);
    const second = await reconnect(relay, worker, 'employee');
    assert.equal(second.ok.type, 'auth_ok');
    await eventually('the restarted relay has written the whole backlog', async () => (await queueDepth(relay!)) === 0, 30_000);
    // A direct message after the backlog: once it arrives, so has everything written before it.
    const bossBack = await reconnect(relay, boss, 'boss', { authkey: CHILD_AUTHKEY });
    bossBack.socket.send({ type: 'message', to: worker.id, payload: 'end', msg_id: 'end-0' });
    await second.socket.next((f) => f.type === 'message' && f.msg_id === 'end-0', 30_000);
    const secondIds = takeMessages(second.socket).map(index);

    const inOrder = (ids: number[]) => ids.every((id, i) => i === 0 || id > ids[i - 1]!);
    assert.ok(inOrder(firstIds), 'before the kill the backlog arrives in send order');
    assert.ok(inOrder(secondIds), 'after the restart the rest arrives in send order');
    const union = new Set([...firstIds, ...secondIds]);
    assert.equal(union.size, total, 'every queued message arrives');
    const firstSet = new Set(firstIds);
    const twice = secondIds.filter((id) => firstSet.has(id)).length;
    t.diagnostic(`kill -9 mid-drain: ${firstIds.length} received before the kill, ${secondIds.length} after the restart, ${twice} twice (bound ${DRAIN_BATCH_ENTRIES})`);
    assert.ok(
      twice <= DRAIN_BATCH_ENTRIES,
      `${twice} messages arrived twice: more than the ${DRAIN_BATCH_ENTRIES} entries one drain batch writes before its removal is on disk`,
    );
    await Promise.all([second.socket.close(), bossBack.socket.close()]);
  } finally {
    if (relay) await relay.child.stop('SIGKILL');
    await fs.rm(dir, { recursive: true, force: true });
  }
});
