// Fault tests, crashes and restarts: kill -9 while messages are being queued, a sender that
// resends everything after a reconnect and after a restart, and damaged lines in the data files.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { createLogger } from '../lib/logger';
import { CHILD_AUTHKEY, eventually, startRelayProcess, type RelayProcess } from './fault-support';
import {
  authBoss,
  authEmployee,
  http,
  makeTempDir,
  reconnect,
  startTestRelay,
  TEST_AUTHKEY,
  type Frame,
  type RelayEndpoint,
  type TestRelay,
  type TestSocket,
} from './support';

async function isOnline(relay: RelayEndpoint, id: string): Promise<boolean> {
  const { body } = await http(relay, 'GET', '/api/employees');
  const employee = (body.employees as { id: string; online: boolean }[]).find((e) => e.id === id);
  assert.ok(employee, `${id} is listed in /api/employees`);
  return employee.online;
}

/** Every `message` frame that arrives until none has come for `quietMs`. */
async function drainMessages(socket: TestSocket, quietMs: number): Promise<Frame[]> {
  const received: Frame[] = [];
  for (;;) {
    try {
      received.push(await socket.next('message', quietMs));
    } catch {
      return received;
    }
  }
}

const index = (msgId: unknown) => Number(String(msgId).split('-').pop());

test('kill -9 while a boss streams 5,000 queued messages: each one acked as queued arrives once, in order, after the restart', async () => {
  const dir = await makeTempDir();
  let relay: RelayProcess | undefined = await startRelayProcess(dir);
  try {
    const boss = await authBoss(relay, CHILD_AUTHKEY);
    const worker = await authEmployee(relay, 'Offline', ['queue']);
    await worker.socket.close();
    await eventually('the employee shows offline', async () => !(await isOnline(relay!, worker.id)));

    const total = 5000;
    const window = 200;
    const killAfterAcks = 2500;
    const queuedAcks: number[] = [];
    let sent = 0;
    const takeAck = (ack: Frame) => {
      assert.deepEqual(ack.queued, [worker.id], `ack of ${String(ack.msg_id)} says queued`);
      assert.deepEqual([ack.delivered, ack.failed], [[], []]);
      queuedAcks.push(index(ack.msg_id));
    };
    // Keep `window` messages in flight so the kill lands mid-stream, with writes pending.
    while (queuedAcks.length < killAfterAcks) {
      while (sent < total && sent - queuedAcks.length < window) {
        boss.socket.send({ type: 'message', to: worker.id, payload: { i: sent }, msg_id: `kill-${sent}`, queue: true });
        sent++;
      }
      takeAck(await boss.socket.next('delivery_ack', 15_000));
    }
    // The rest goes out in the same tick as the kill, so the relay dies with frames it has not
    // acked yet however fast it writes (with only the window in flight, a fast disk could ack
    // all of it before the signal lands).
    while (sent < total) {
      boss.socket.send({ type: 'message', to: worker.id, payload: { i: sent }, msg_id: `kill-${sent}`, queue: true });
      sent++;
    }
    relay.child.child.kill('SIGKILL');
    assert.equal((await relay.child.exited).signal, 'SIGKILL');
    await boss.socket.closed;
    for (const frame of boss.socket.frames.splice(0)) if (frame.type === 'delivery_ack') takeAck(frame);
    assert.ok(sent > queuedAcks.length, 'some messages were still unacknowledged when the relay died');
    assert.deepEqual(queuedAcks, [...queuedAcks].sort((a, b) => a - b), 'acks came in send order');

    relay = await startRelayProcess(dir);
    const back = await reconnect(relay, worker, 'employee');
    assert.equal(back.ok.type, 'auth_ok');
    const received = (await drainMessages(back.socket, 2000)).map((frame) => {
      assert.equal(frame.from_id, boss.id);
      assert.equal(index(frame.msg_id), (frame.payload as { i: number }).i);
      return index(frame.msg_id);
    });
    assert.equal(new Set(received).size, received.length, 'no message arrives twice');
    assert.deepEqual(received, [...received].sort((a, b) => a - b), 'messages arrive in send order');
    const missing = queuedAcks.filter((i) => !received.includes(i));
    assert.deepEqual(missing, [], 'every message acked as queued is delivered');
    assert.ok(received.every((i) => i < sent));
    await back.socket.close();

    const again = await reconnect(relay, worker, 'employee');
    await assert.rejects(again.socket.next('message', 500), 'nothing is delivered a second time');
    await again.socket.close();
  } finally {
    if (relay) await relay.child.stop('SIGKILL');
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('a sender that resends everything after a reconnect and after a restart gets duplicate acks and no double delivery', async () => {
  let env = await startTestRelay();
  try {
    const boss = await authBoss(env.relay);
    const worker = await authEmployee(env.relay, 'Receiver', ['resend']);
    const perHalf = 100;
    const firstAcks = new Map<string, Frame>();
    const send = (socket: TestSocket, i: number) =>
      socket.send({ type: 'message', to: worker.id, payload: { i }, msg_id: `resend-${i}`, queue: true });
    const collectAcks = async (socket: TestSocket, count: number) => {
      const acks: Frame[] = [];
      for (let n = 0; n < count; n++) acks.push(await socket.next('delivery_ack'));
      return acks;
    };

    // First half reaches the employee online, second half is queued while it is away; each
    // queued one is sent twice back to back, before its first ack (which waits for the disk).
    for (let i = 0; i < perHalf; i++) send(boss.socket, i);
    for (const ack of await collectAcks(boss.socket, perHalf)) firstAcks.set(String(ack.msg_id), ack);
    const online = await Promise.all(Array.from({ length: perHalf }, () => worker.socket.next('message')));
    await worker.socket.close();
    await eventually('the employee shows offline', async () => !(await isOnline(env.relay, worker.id)));
    for (let i = perHalf; i < 2 * perHalf; i++) {
      send(boss.socket, i);
      send(boss.socket, i);
    }
    for (const ack of await collectAcks(boss.socket, 2 * perHalf)) {
      const id = String(ack.msg_id);
      if (ack.duplicate === true) continue;
      assert.equal(firstAcks.has(id), false, `${id} is acked as new only once`);
      firstAcks.set(id, ack);
    }
    assert.equal(firstAcks.size, 2 * perHalf);
    for (let i = 0; i < 2 * perHalf; i++) {
      const ack = firstAcks.get(`resend-${i}`)!;
      assert.equal(ack.duplicate, undefined);
      assert.deepEqual(i < perHalf ? ack.delivered : ack.queued, [worker.id]);
    }

    const resendAll = async (socket: TestSocket) => {
      for (let i = 0; i < 2 * perHalf; i++) send(socket, i);
      for (const ack of await collectAcks(socket, 2 * perHalf)) {
        const first = firstAcks.get(String(ack.msg_id))!;
        assert.equal(ack.duplicate, true, `resent ${String(ack.msg_id)} is acked as a duplicate`);
        assert.deepEqual([ack.delivered, ack.failed, ack.queued], [first.delivered, first.failed, first.queued]);
      }
    };
    // The sender's connection drops without a close handshake; it reconnects and resends all.
    boss.socket.ws.terminate();
    const bossBack = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    await resendAll(bossBack.socket);

    const workerBack = await reconnect(env.relay, worker, 'employee');
    const queued = await drainMessages(workerBack.socket, 500);
    const received = [...online, ...queued].map((frame) => (frame.payload as { i: number }).i);
    assert.deepEqual(received, Array.from({ length: 2 * perHalf }, (_, i) => i), 'each message once, in send order');
    await Promise.all([workerBack.socket.close(), bossBack.socket.close()]);

    // The dedupe window is rebuilt from messages.db at start.
    env = await env.restart();
    const bossAfter = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    const workerAfter = await reconnect(env.relay, worker, 'employee');
    await resendAll(bossAfter.socket);
    assert.deepEqual(await drainMessages(workerAfter.socket, 500), [], 'nothing is delivered again after the restart');
    await Promise.all([workerAfter.socket.close(), bossAfter.socket.close()]);
  } finally {
    await env.dispose();
  }
});

async function readLines(file: string): Promise<string[]> {
  return (await fs.readFile(file, 'utf8')).split('\n').filter((line) => line !== '');
}

test('a truncated last line in messages.db and damaged lines in connections.db and identities.db do not stop the start', async () => {
  const env = await startTestRelay();
  const file = (name: string) => path.join(env.dataDir, name);
  let restarted: TestRelay | undefined;
  try {
    const boss = await authBoss(env.relay);
    const worker = await authEmployee(env.relay, 'Survivor', ['disk']);
    for (let i = 0; i < 3; i++) {
      boss.socket.send({ type: 'message', to: worker.id, payload: { i }, msg_id: `disk-${i}` });
      await boss.socket.next('delivery_ack');
    }
    await Promise.all([boss.socket.close(), worker.socket.close()]);
    await env.relay.close();

    const connectionEvents = (await readLines(file('connections.db'))).length;
    assert.ok(connectionEvents >= 4, 'connections.db holds the auths and disconnects');
    // Power loss mid-append: the last line of messages.db is cut short, without its newline.
    await fs.appendFile(file('messages.db'), '{"_id":"torn-record","msg_id":"torn","timestamp":17');
    const connections = await readLines(file('connections.db'));
    connections.splice(1, 0, '{"identityId":"employee-x","ev\u0000\u0000');
    await fs.writeFile(file('connections.db'), connections.join('\n') + '\n');
    await fs.appendFile(file('identities.db'), '{"_id":"employee-torn","role":"empl\n');

    const warnings: Record<string, unknown>[] = [];
    const logger = createLogger('warn', (line) => warnings.push(JSON.parse(line) as Record<string, unknown>));
    restarted = await startTestRelay({ logger }, env.dataDir);
    const rows = async () => {
      const { status, body } = await http(restarted!.relay, 'GET', `/api/admin/communications?employee_id=${worker.id}`);
      assert.equal(status, 200);
      return (body.rows as { msg_id: string }[]).map((row) => row.msg_id);
    };
    assert.deepEqual(await rows(), ['disk-2', 'disk-1', 'disk-0'], 'the intact messages are kept');
    const skipped = warnings.filter((w) => w.event === 'store_lines_skipped').map((w) => path.basename(String(w.file)));
    assert.deepEqual(skipped.sort(), ['connections.db', 'identities.db', 'messages.db'], 'the skipped lines are logged per file');
    const copies = (await fs.readdir(env.dataDir)).filter((name) => name.includes('.corrupt-')).map((name) => name.split('.corrupt-')[0]);
    assert.deepEqual(copies.sort(), ['connections.db', 'identities.db', 'messages.db'], 'each damaged file is kept as a .corrupt copy');
    const tornLine = warnings.filter((w) => w.event === 'message_log_line_skipped');
    assert.deepEqual(tornLine.map((w) => path.basename(String(w.file))), ['messages.db'], 'the torn line of messages.db is logged');

    // The identities still authenticate and route; what is written after the torn line is kept.
    const bossBack = await reconnect(restarted.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    const workerBack = await reconnect(restarted.relay, worker, 'employee');
    assert.equal(bossBack.ok.type, 'auth_ok');
    assert.equal(workerBack.ok.type, 'auth_ok');
    bossBack.socket.send({ type: 'message', to: worker.id, payload: 'after', msg_id: 'disk-3' });
    assert.deepEqual((await bossBack.socket.next('delivery_ack')).delivered, [worker.id]);
    assert.equal((await workerBack.socket.next('message')).payload, 'after');
    await Promise.all([bossBack.socket.close(), workerBack.socket.close()]);
    await restarted.relay.close();

    const eventsAfter = await readLines(file('connections.db'));
    assert.ok(eventsAfter.length >= connectionEvents + 4, 'the intact connection events are kept and new ones appended');
    assert.ok(eventsAfter.every((line) => !line.includes('"ev\u0000')), 'the damaged line is gone from the live file');

    restarted = await startTestRelay({}, env.dataDir);
    assert.deepEqual(await rows(), ['disk-3', 'disk-2', 'disk-1', 'disk-0'], 'a record written after the torn line survives the next start');
  } finally {
    await restarted?.relay.close();
    await env.dispose();
  }
});
