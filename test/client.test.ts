// RelayClient against the real relay: talking both ways, keeping sends across a relay restart
// and a lost ack (each delivered exactly once), identity files, the pending-send bound, auth
// rejections that stop reconnecting, heartbeats and ack timeouts.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import WebSocket, { WebSocketServer } from 'ws';
import { RelayClient, RelayClientError, type RelayClientEvents, type RelayClientOptions, type StatusChange } from '../client';
import { authBoss, http, makeTempDir, reconnect, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';

type Row = { msg_id: string; delivery: { status: string } };

/** A client that redials quickly, so tests do not wait on the production backoff. */
function makeClient(options: RelayClientOptions): RelayClient {
  return new RelayClient({ minReconnectDelayMs: 20, maxReconnectDelayMs: 200, heartbeatIntervalMs: 0, ...options });
}

const boss = (url: string, more: Partial<RelayClientOptions> = {}) => makeClient({ url, role: 'boss', authkey: TEST_AUTHKEY, ...more });
const employee = (url: string, more: Partial<RelayClientOptions> = {}) =>
  makeClient({ url, role: 'employee', name: 'Worker', tags: ['general'], ...more });

/** The next value of `event` that passes `accept`. */
function nextEvent<E extends keyof RelayClientEvents>(
  client: RelayClient,
  event: E,
  accept: (value: RelayClientEvents[E]) => boolean = () => true,
  timeoutMs = 5000,
): Promise<RelayClientEvents[E]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for ${event}`));
    }, timeoutMs);
    const off = client.on(event, (value) => {
      if (!accept(value)) return;
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

function collect<E extends keyof RelayClientEvents>(client: RelayClient, event: E): RelayClientEvents[E][] {
  const seen: RelayClientEvents[E][] = [];
  client.on(event, (value) => seen.push(value));
  return seen;
}

async function until(condition: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const started = Date.now();
  while (!condition()) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function messageRows(env: TestRelay, employeeId: string): Promise<Row[]> {
  const log = await http(env.relay, 'GET', `/api/admin/communications?employee_id=${employeeId}&limit=500`);
  return log.body.rows as Row[];
}

describe('RelayClient', () => {
  test('a boss and an employee exchange messages and acks', async () => {
    const env = await startTestRelay();
    const worker = employee(env.relay.url, { tags: ['research'] });
    const chief = boss(env.relay.url);
    try {
      const workerOk = await worker.connect();
      assert.equal(workerOk.role, 'employee');
      assert.equal((await chief.connect()).role, 'boss');
      const inbound = nextEvent(worker, 'message');
      const ack = await chief.send(workerOk.id, { task: 'summarise' });
      assert.deepEqual(ack.delivered, [workerOk.id]);
      assert.deepEqual(ack.failed, []);
      const message = await inbound;
      assert.deepEqual(message.payload, { task: 'summarise' });
      assert.equal(message.msg_id, ack.msg_id);
      assert.equal(message.from_id, chief.identity?.id);

      const reply = nextEvent(chief, 'message');
      await worker.send(message.from_id, { done: true });
      assert.deepEqual((await reply).payload, { done: true });
      const byTag = await chief.send('tag:research', 'to the research tag');
      assert.deepEqual(byTag.delivered, [workerOk.id]);
      const unknown = await chief.send('employee-unknown', 1);
      assert.deepEqual(unknown.failed, [{ id: 'employee-unknown', reason: 'target_not_found' }]);
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await env.dispose();
    }
  });

  test('sends made while the relay is down wait, are resent after the restart, and each is delivered exactly once', async () => {
    let env = await startTestRelay();
    const port = env.relay.port;
    const url = env.relay.url;
    const worker = employee(url);
    const chief = boss(url);
    const received = collect(worker, 'message');
    const statuses = collect(chief, 'status');
    try {
      const workerId = (await worker.connect()).id;
      await chief.connect();
      // Some sends are on the wire as the relay stops: acked or not, they must arrive once.
      const beforeStop = [0, 1, 2].map((i) => chief.send(workerId, { i }, { queue: true }));
      await env.relay.close();
      await until(() => chief.status !== 'authenticated' && worker.status !== 'authenticated', 'both clients to see the relay gone');
      const whileDown = [3, 4, 5, 6, 7].map((i) => chief.send(workerId, { i }, { queue: true }));
      assert.ok(chief.pendingCount >= 5, 'sends made while disconnected wait in the pending queue');

      env = await env.restart({ port });
      const acks = await Promise.all([...beforeStop, ...whileDown]);
      for (const ack of acks) assert.deepEqual(ack.failed, [], JSON.stringify(ack));
      await until(() => received.length >= 8, 'all eight messages at the employee', 10_000);
      assert.deepEqual(
        received.map((m) => (m.payload as { i: number }).i).sort((a, b) => a - b),
        [0, 1, 2, 3, 4, 5, 6, 7],
      );
      assert.equal(new Set(received.map((m) => m.msg_id)).size, 8, 'no message reached the employee twice');
      const rows = await messageRows(env, workerId);
      assert.deepEqual(rows.map((r) => r.msg_id).sort(), acks.map((a) => a.msg_id).sort(), 'the relay routed each msg_id once');
      assert.ok(statuses.some((s) => s.status === 'reconnecting'));
      assert.equal(chief.pendingCount, 0);
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await env.dispose();
    }
  });

  test('a send whose ack was lost with the connection is resent with its msg_id and not routed twice', async () => {
    const env = await startTestRelay();
    const proxy = await startAckDroppingProxy(env.relay.url);
    const worker = employee(env.relay.url);
    const chief = boss(proxy.url);
    const received = collect(worker, 'message');
    try {
      const workerId = (await worker.connect()).id;
      await chief.connect();
      proxy.dropNextAck = true;
      const ack = await chief.send(workerId, 'once', { msgId: 'lost-ack-1' });
      assert.equal(proxy.droppedAcks, 1, 'the first ack never reached the client');
      assert.equal(ack.duplicate, true, 'the ack came from the relay answering the resent msg_id');
      assert.deepEqual(ack.delivered, [workerId]);
      assert.equal(received.length, 1);
      assert.deepEqual((await messageRows(env, workerId)).map((r) => r.msg_id), ['lost-ack-1']);
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await proxy.close();
      await env.dispose();
    }
  });

  test('an identity file is written owner-only and reused on the next start', async () => {
    const env = await startTestRelay();
    const dir = await makeTempDir();
    const file = path.join(dir, 'nested', 'worker.json');
    try {
      const first = employee(env.relay.url, { identityFile: file });
      const ok = await first.connect();
      assert.equal(ok.reconnected, false);
      await first.close();
      const stat = await fs.stat(file);
      assert.equal(stat.mode & 0o777, 0o600);
      assert.deepEqual(JSON.parse(await fs.readFile(file, 'utf8')), { id: ok.id, key: ok.key, role: 'employee' });

      const second = employee(env.relay.url, { identityFile: file, name: undefined, tags: undefined });
      const again = await second.connect();
      assert.equal(again.reconnected, true);
      assert.equal(again.id, ok.id);
      await second.close();

      const asBoss = boss(env.relay.url, { identityFile: file });
      await assert.rejects(asBoss.connect(), (e: RelayClientError) => e.code === 'identity_file_invalid' && e.message.includes(file));
    } finally {
      await env.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('an identity file the relay does not know stops the client with a clear error and is left alone', async () => {
    const env = await startTestRelay();
    const dir = await makeTempDir();
    const file = path.join(dir, 'stale.json');
    const stale = JSON.stringify({ id: 'employee-00000000-0000-4000-8000-000000000000', key: 'k', role: 'employee' });
    await fs.writeFile(file, stale, { mode: 0o600 });
    const client = employee(env.relay.url, { identityFile: file });
    const statuses = collect(client, 'status');
    try {
      await assert.rejects(client.connect(), (e: RelayClientError) => {
        assert.equal(e.code, 'identity_not_found');
        assert.match(e.message, /stale\.json/);
        assert.match(e.message, /Remove that file/);
        return true;
      });
      assert.equal(client.status, 'closed');
      assert.ok(!statuses.some((s: StatusChange) => s.status === 'reconnecting'), 'no retry after a rejection that cannot succeed');
      assert.equal(await fs.readFile(file, 'utf8'), stale, 'the client did not silently register a new identity');
      await assert.rejects(client.send('*', 1), (e: RelayClientError) => e.code === 'identity_not_found', 'later calls say why it stopped');
    } finally {
      await client.close();
      await env.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a wrong authkey rejects connect() and stops reconnecting', async () => {
    const env = await startTestRelay();
    const client = boss(env.relay.url, { authkey: 'wrong' });
    const statuses = collect(client, 'status');
    const pendingSend = client.send('*', 'never');
    try {
      await assert.rejects(client.connect(), (e: RelayClientError) => e.code === 'invalid_authkey' && e.frame?.type === 'error');
      await assert.rejects(pendingSend, (e: RelayClientError) => e.code === 'invalid_authkey');
      assert.deepEqual(statuses.map((s) => s.status), ['connecting', 'open', 'closed']);
    } finally {
      await client.close();
      await env.dispose();
    }
  });

  test('pending sends are bounded: past maxPendingSends send() rejects with pending_full', async () => {
    const env = await startTestRelay();
    const chief = boss(env.relay.url, { maxPendingSends: 2 });
    const worker = employee(env.relay.url);
    try {
      const workerId = (await worker.connect()).id;
      const waiting = [chief.send(workerId, 1), chief.send(workerId, 2)];
      await assert.rejects(chief.send(workerId, 3), (e: RelayClientError) => {
        assert.equal(e.code, 'pending_full');
        assert.match(e.message, /maxPendingSends/);
        return true;
      });
      assert.equal(chief.pendingCount, 2);
      await chief.connect();
      const acks = await Promise.all(waiting);
      assert.deepEqual(acks.map((a) => a.delivered), [[workerId], [workerId]]);
      assert.deepEqual((await chief.send(workerId, 4)).delivered, [workerId], 'room again once acked');
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await env.dispose();
    }
  });

  test('bad sends are refused before they reach the relay', async () => {
    const chief = boss('ws://127.0.0.1:9/ws');
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    await assert.rejects(chief.send('', 1), (e: RelayClientError) => e.code === 'invalid_to');
    await assert.rejects(chief.send('x', 1, { msgId: 'm'.repeat(300) }), (e: RelayClientError) => e.code === 'invalid_msg_id');
    await assert.rejects(chief.send('x', 1, { ttlMs: -1 }), (e: RelayClientError) => e.code === 'invalid_frame');
    await assert.rejects(chief.send('x', cyclic), (e: RelayClientError) => e.code === 'invalid_json');
    assert.equal(chief.pendingCount, 0);
    await chief.close();
  });

  test('a frame over the relay limit rejects its own send with payload_too_large; the connection stays usable', async () => {
    const env = await startTestRelay({ maxPayloadBytes: 2048 });
    const chief = boss(env.relay.url);
    const worker = employee(env.relay.url);
    try {
      const workerId = (await worker.connect()).id;
      await chief.connect();
      const small = chief.send(workerId, 'small');
      const big = chief.send(workerId, 'x'.repeat(4096));
      await assert.rejects(big, (e: RelayClientError) => e.code === 'payload_too_large' && e.frame?.code === 'payload_too_large');
      assert.deepEqual((await small).delivered, [workerId]);
      assert.deepEqual((await chief.send(workerId, 'after')).delivered, [workerId]);
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await env.dispose();
    }
  });

  test('sends the relay drops as rate_limited are written again after retry_after_ms, each delivered once', async () => {
    const env = await startTestRelay({ rateLimit: 20 });
    const chief = boss(env.relay.url);
    const worker = employee(env.relay.url);
    const received = collect(worker, 'message');
    const frames = collect(chief, 'frame');
    try {
      const workerId = (await worker.connect()).id;
      await chief.connect();
      const acks = await Promise.all(Array.from({ length: 50 }, (_, i) => chief.send(workerId, i)));
      assert.ok(acks.every((a) => a.delivered[0] === workerId));
      assert.ok(frames.some((f) => f.type === 'error' && f.code === 'rate_limited'), 'the relay did rate-limit this burst');
      await until(() => received.length >= 50, 'all fifty messages');
      assert.deepEqual(received.map((m) => m.payload).sort((a, b) => Number(a) - Number(b)), Array.from({ length: 50 }, (_, i) => i));
      assert.equal(new Set(received.map((m) => m.msg_id)).size, 50);
    } finally {
      await Promise.all([worker.close(), chief.close()]);
      await env.dispose();
    }
  });

  test('an ack that does not come within ackTimeoutMs rejects the send; close() rejects the rest', async () => {
    const env = await startTestRelay();
    const port = env.relay.port;
    await env.dispose();
    const chief = boss(`ws://127.0.0.1:${port}/ws`, { ackTimeoutMs: 50 });
    const errors = collect(chief, 'error');
    void chief.connect().catch(() => undefined);
    await assert.rejects(chief.send('*', 1), (e: RelayClientError) => e.code === 'ack_timeout');
    const noTimeout = boss(`ws://127.0.0.1:${port}/ws`);
    const waiting = noTimeout.send('*', 2);
    await noTimeout.close();
    await assert.rejects(waiting, (e: RelayClientError) => e.code === 'closed');
    await chief.close();
    assert.ok(errors.some((e) => e instanceof RelayClientError && e.code === 'connection_failed'));
  });

  test('a connection that goes silent is dropped after two heartbeat intervals and redialled', async () => {
    const env = await startTestRelay();
    const proxy = await startAckDroppingProxy(env.relay.url);
    const worker = employee(proxy.url, { heartbeatIntervalMs: 40 });
    try {
      const first = await worker.connect();
      proxy.mute = true;
      await nextEvent(worker, 'status', (s) => s.status === 'reconnecting');
      proxy.mute = false;
      await nextEvent(worker, 'status', (s) => s.status === 'authenticated');
      assert.equal(worker.identity?.id, first.id);
    } finally {
      await worker.close();
      await proxy.close();
      await env.dispose();
    }
  });

  test('heartbeats are pings the relay answers', async () => {
    const env = await startTestRelay();
    const worker = employee(env.relay.url, { heartbeatIntervalMs: 30 });
    try {
      await worker.connect();
      const pong = await nextEvent(worker, 'frame', (f) => f.type === 'pong');
      assert.equal(typeof pong.timestamp, 'number');
    } finally {
      await worker.close();
      await env.dispose();
    }
  });

  test('a message the relay routes twice (same from_id and msg_id) reaches the application once; twice with the dedupe off', async () => {
    // A relay started without its own dedupe routes a repeated msg_id again: the same thing the
    // relay does inside its documented at-least-once window after a crash.
    let env = await startTestRelay({ dedupeWindowMs: 0 });
    const port = env.relay.port;
    const deduped = employee(env.relay.url, { name: 'Deduped' });
    const plain = employee(env.relay.url, { name: 'Plain', inboundDedupeWindowMs: 0 });
    const seen = collect(deduped, 'message');
    const seenPlain = collect(plain, 'message');
    const frames = collect(deduped, 'frame');
    const authenticated = (client: RelayClient, statuses: StatusChange[]) => () =>
      client.status === 'authenticated' && statuses.filter((s) => s.status === 'authenticated').length >= 2;
    const dedupedStatuses = collect(deduped, 'status');
    const plainStatuses = collect(plain, 'status');
    const sender = await authBoss(env.relay);
    let socket = sender.socket;
    try {
      const to = [(await deduped.connect()).id, (await plain.connect()).id];
      socket.send({ type: 'message', to, payload: 'work', msg_id: 'twice-1' });
      assert.deepEqual((await socket.next('delivery_ack')).delivered, to);
      await until(() => seen.length === 1 && seenPlain.length === 1, 'the first copy at both employees');

      env = await env.restart({ port });
      await until(authenticated(deduped, dedupedStatuses), 'the first employee back');
      await until(authenticated(plain, plainStatuses), 'the second employee back');
      socket = (await reconnect(env.relay, sender, 'boss', { authkey: TEST_AUTHKEY })).socket;
      socket.send({ type: 'message', to, payload: 'work', msg_id: 'twice-1' });
      assert.deepEqual((await socket.next('delivery_ack')).delivered, to, 'the relay routed the repeat again');
      socket.send({ type: 'message', to, payload: 'next', msg_id: 'after-1' });
      await socket.next('delivery_ack');
      await until(() => seen.some((m) => m.msg_id === 'after-1') && seenPlain.some((m) => m.msg_id === 'after-1'), 'the next message at both');

      assert.equal(frames.filter((f) => f.type === 'message' && f.msg_id === 'twice-1').length, 2, 'the frame arrived twice');
      assert.deepEqual(seen.map((m) => m.msg_id), ['twice-1', 'after-1'], 'the application saw it once');
      assert.deepEqual(seenPlain.map((m) => m.msg_id), ['twice-1', 'twice-1', 'after-1'], 'with inboundDedupeWindowMs 0 it sees both');
    } finally {
      await socket.close();
      await Promise.all([deduped.close(), plain.close()]);
      await env.dispose();
    }
  });

  test('inbound dedupe memory is bounded by count: an id pushed out of the window is passed on again', async () => {
    const env = await startTestRelay({ dedupeWindowMs: 0 });
    const worker = employee(env.relay.url, { inboundDedupeMaxEntries: 2 });
    const seen = collect(worker, 'message');
    const sender = await authBoss(env.relay);
    try {
      const id = (await worker.connect()).id;
      for (const msgId of ['a', 'b', 'a', 'c', 'a', 'x']) {
        sender.socket.send({ type: 'message', to: id, payload: msgId, msg_id: msgId });
        await sender.socket.next('delivery_ack');
      }
      await until(() => seen.some((m) => m.msg_id === 'x'), 'the last message');
      // a, b remembered: the second a is dropped; c pushes a out, so the third a is passed on.
      assert.deepEqual(seen.map((m) => m.msg_id), ['a', 'b', 'c', 'a', 'x']);
    } finally {
      await sender.socket.close();
      await worker.close();
      await env.dispose();
    }
  });

  test('a queued message raises delivery_update at the sender when the employee comes back', async () => {
    const env = await startTestRelay();
    const dir = await makeTempDir();
    const file = path.join(dir, 'worker.json');
    const chief = boss(env.relay.url);
    try {
      const first = employee(env.relay.url, { identityFile: file });
      const workerId = (await first.connect()).id;
      await first.close();
      await chief.connect();
      const ack = await chief.send(workerId, 'later', { queue: true });
      assert.deepEqual(ack.queued, [workerId]);
      const update = nextEvent(chief, 'delivery_update');
      const back = employee(env.relay.url, { identityFile: file });
      const inbound = nextEvent(back, 'message');
      await back.connect();
      assert.equal((await inbound).payload, 'later');
      const seen = await update;
      assert.deepEqual([seen.msg_id, seen.id, seen.status], [ack.msg_id, workerId, 'delivered']);
      await back.close();
    } finally {
      await chief.close();
      await env.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

interface AckDroppingProxy {
  url: string;
  dropNextAck: boolean;
  /** Forward nothing from the relay: a connection that went silent without closing. */
  mute: boolean;
  droppedAcks: number;
  close(): Promise<void>;
}

/** A WebSocket proxy to the relay that can swallow one delivery_ack and then cut the client off, or go silent. */
async function startAckDroppingProxy(upstreamUrl: string): Promise<AckDroppingProxy> {
  const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  const { port } = server.address() as { port: number };
  const proxy: AckDroppingProxy = {
    url: `ws://127.0.0.1:${port}/ws`,
    dropNextAck: false,
    mute: false,
    droppedAcks: 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const client of server.clients) client.terminate();
        server.close(() => resolve());
      }),
  };
  server.on('connection', (downstream) => {
    const upstream = new WebSocket(upstreamUrl);
    const early: string[] = [];
    upstream.on('open', () => early.splice(0).forEach((text) => upstream.send(text)));
    downstream.on('message', (data) => {
      if (upstream.readyState === WebSocket.OPEN) upstream.send(data.toString());
      else early.push(data.toString());
    });
    upstream.on('message', (data) => {
      const text = data.toString();
      if (proxy.mute) return;
      if (proxy.dropNextAck && (JSON.parse(text) as { type: string }).type === 'delivery_ack') {
        proxy.dropNextAck = false;
        proxy.droppedAcks++;
        downstream.terminate();
        return;
      }
      downstream.send(text);
    });
    downstream.on('close', () => upstream.close());
    upstream.on('close', () => downstream.close());
    upstream.on('error', () => downstream.terminate());
    downstream.on('error', () => upstream.terminate());
  });
  return proxy;
}
