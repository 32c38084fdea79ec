// GET /api/events: order and metadata-only data on a real relay, Last-Event-ID resume (from the
// ring, past the ring, across a restart), and the slow-consumer bound: a client that stops
// reading is dropped while routing goes on.

import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { EventStream } from '../lib/event-stream';
import { EventBus, type RelayEvent } from '../lib/events';
import { authBoss, authEmployee, clusterKnownGap, singleRelayOnly, startTestRelay, type TestRelay } from './support';

interface SseEvent {
  id: string | null;
  event: string;
  data: Record<string, unknown>;
}

/** A reading SSE client: parses frames and lets a test await the next one. */
class SseClient {
  readonly events: SseEvent[] = [];
  raw = '';
  private buffer = '';
  private waiters: { count: number; resolve: () => void }[] = [];
  private request: http.ClientRequest | null = null;
  status = 0;
  contentType = '';
  /** Resolves when the server ends or drops the stream. */
  ended: Promise<void> = Promise.resolve();

  static open(url: string, headers: Record<string, string> = {}): Promise<SseClient> {
    const client = new SseClient();
    return new Promise((resolve, reject) => {
      client.request = http.get(url, { headers }, (res) => {
        client.status = res.statusCode ?? 0;
        client.contentType = String(res.headers['content-type']);
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => client.onData(chunk));
        res.on('error', () => undefined);
        client.ended = new Promise((done) => res.once('close', () => done()));
        resolve(client);
      });
      client.request.on('error', reject);
    });
  }

  private onData(chunk: string): void {
    this.raw += chunk;
    this.buffer += chunk;
    let end: number;
    while ((end = this.buffer.indexOf('\n\n')) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const fields = new Map<string, string>();
      for (const line of block.split('\n')) {
        if (line.startsWith(':') || line === '') continue;
        const colon = line.indexOf(':');
        fields.set(line.slice(0, colon), line.slice(colon + 1).replace(/^ /, ''));
      }
      if (!fields.has('data')) continue;
      this.events.push({ id: fields.get('id') ?? null, event: fields.get('event') ?? 'message', data: JSON.parse(fields.get('data')!) as Record<string, unknown> });
    }
    this.waiters = this.waiters.filter((w) => {
      if (this.events.length < w.count) return true;
      w.resolve();
      return false;
    });
  }

  /** Resolves once `count` events in total have arrived. */
  waitFor(count: number, timeoutMs = 5000): Promise<SseEvent[]> {
    if (this.events.length >= count) return Promise.resolve(this.events);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out with ${this.events.length} of ${count} events: ${this.events.map((e) => e.event).join(',')}`)), timeoutMs);
      this.waiters.push({
        count,
        resolve: () => {
          clearTimeout(timer);
          resolve(this.events);
        },
      });
    });
  }

  close(): void {
    this.request?.destroy();
  }
}

describe('event stream on a running relay', () => {
  let relay: TestRelay;
  before(async () => {
    relay = await startTestRelay();
  });
  after(async () => {
    await relay.dispose();
  });

  test('events arrive in order with increasing ids, and carry no payloads', clusterKnownGap("a message event comes from the sender's node once its ack is complete, so a target on another node can act on the message (its health report) before that event reaches the stream"), async () => {
    const stream = await SseClient.open(relay.relay.httpUrl + '/api/events');
    assert.equal(stream.status, 200);
    assert.match(stream.contentType, /^text\/event-stream/);
    const boss = await authBoss(relay.relay);
    const worker = await authEmployee(relay.relay, 'Stream-Worker', ['stream']);
    boss.socket.send({ type: 'message', to: worker.id, payload: { secret: 'do-not-stream-me' }, msg_id: 'order-1' });
    await worker.socket.next('message');
    worker.socket.send({ type: 'health_report', valid: true });
    await worker.socket.next('health_report_ack');
    await worker.socket.close();
    const events = await stream.waitFor(5);
    assert.deepEqual(events.slice(0, 5).map((e) => e.event), ['connect', 'connect', 'message', 'health', 'disconnect']);
    const ids = events.map((e) => Number(e.id));
    for (let i = 1; i < ids.length; i++) assert.ok(ids[i]! > ids[i - 1]!, `ids must increase: ${ids.join(',')}`);
    const message = events[2]!.data;
    assert.equal(message.msg_id, 'order-1');
    assert.deepEqual(message.delivered, [worker.id]);
    assert.equal(typeof message.bytes, 'number');
    assert.equal('payload' in message, false);
    assert.equal(stream.raw.includes('do-not-stream-me'), false);
    assert.equal((events[1]!.data.node as { name: string }).name, 'Stream-Worker');
    stream.close();
    await boss.socket.close();
  });

  test('a stream carries every event from the moment it opens, wherever it happens', async () => {
    // Against a cluster the balancer spreads these sessions over the nodes: the stream's node
    // must hear the others' events from its first byte, not from its next heartbeat.
    const stream = await SseClient.open(relay.relay.httpUrl + '/api/events');
    const names = ['Opening-1', 'Opening-2', 'Opening-3', 'Opening-4'];
    const workers = [];
    for (const name of names) workers.push(await authEmployee(relay.relay, name, ['opening']));
    const connected = () => new Set(stream.events.filter((e) => e.event === 'connect').map((e) => (e.data.node as { name: string }).name));
    await stream.waitFor(names.length);
    await waitUntil(async () => names.every((name) => connected().has(name)));
    assert.deepEqual([...connected()].sort(), names);
    stream.close();
    await Promise.all(workers.map((w) => w.socket.close()));
  });

  test('a client that reconnects with Last-Event-ID gets exactly what it missed', async () => {
    const first = await SseClient.open(relay.relay.httpUrl + '/api/events');
    const a = await authEmployee(relay.relay, 'Resume-A');
    const [seen] = await first.waitFor(1);
    first.close();
    const b = await authEmployee(relay.relay, 'Resume-B');
    await a.socket.close();
    const resumed = await SseClient.open(relay.relay.httpUrl + '/api/events', { 'last-event-id': seen!.id! });
    const events = await resumed.waitFor(2);
    assert.deepEqual(
      events.map((e) => [e.event, (e.data.node as { name: string }).name]),
      [
        ['connect', 'Resume-B'],
        ['disconnect', 'Resume-A'],
      ],
    );
    assert.equal(Number(events[0]!.id), Number(seen!.id) + 1);
    resumed.close();
    await b.socket.close();
  });

  test('a client that stops reading is dropped while the relay keeps routing', singleRelayOnly('counts the stuck stream in /metrics, which is per node: the stream and each scrape may reach different nodes'), async () => {
    // A raw socket that sends the request and never reads the answer.
    const stuck = net.connect(relay.relay.port, '127.0.0.1');
    stuck.on('error', () => undefined);
    await new Promise<void>((resolve) => stuck.once('connect', () => resolve()));
    stuck.pause();
    stuck.write('GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    const metric = async (name: string) => {
      const text = await (await fetch(relay.relay.httpUrl + '/metrics')).text();
      const line = text.split('\n').find((l) => l.startsWith(name + ' '));
      return Number(line?.split(' ')[1]);
    };
    await waitUntil(async () => (await metric('mimiclaw_event_stream_clients')) === 1);

    // Each message names 1000 unknown targets, so each event is ~70 KB of failures.
    const boss = await authBoss(relay.relay);
    const targets = Array.from({ length: 1000 }, (_, i) => `employee-00000000-0000-4000-8000-${String(i).padStart(12, '0')}`);
    let dropped = false;
    let sent = 0;
    for (; sent < 400 && !dropped; sent++) {
      boss.socket.send({ type: 'message', to: targets, payload: sent });
      const ack = await boss.socket.next('delivery_ack');
      assert.equal((ack.failed as unknown[]).length, 1000);
      if (sent % 20 === 19) dropped = (await metric('mimiclaw_event_stream_clients')) === 0;
    }
    assert.ok(dropped, `the stuck stream was still open after ${sent} large events`);
    // Routing still answers after the drop.
    const worker = await authEmployee(relay.relay, 'After-Drop');
    boss.socket.send({ type: 'message', to: worker.id, payload: 'still routing' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [worker.id]);
    stuck.destroy();
    await worker.socket.close();
    await boss.socket.close();
  });
});

async function waitUntil(check: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > timeoutMs) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('event stream ring and bounds (plain bus and HTTP server)', () => {
  let bus: EventBus;
  let stream: EventStream;
  let server: http.Server;
  let url: string;
  const node = { id: 'employee-1', role: 'employee' as const, name: 'N', tags: ['t'] };
  const connect = (at: number): RelayEvent => ({ type: 'connect', node, reconnected: false, at });

  before(async () => {
    bus = new EventBus();
    stream = new EventStream({ bus, ringSize: 5, maxBufferedBytes: 64 * 1024, keepAliveMs: 50 });
    server = http.createServer((req, res) => stream.handle(req, res));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
    url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/api/events`;
  });
  after(async () => {
    stream.close();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  test('a Last-Event-ID older than the ring gets a missed notice, then what the ring holds', async () => {
    const base = stream.latestId;
    for (let i = 1; i <= 10; i++) bus.publish(connect(i));
    const client = await SseClient.open(url, { 'last-event-id': String(base + 2) });
    const events = await client.waitFor(6);
    assert.equal(events[0]!.event, 'missed');
    assert.equal(events[0]!.id, null);
    assert.equal(events[0]!.data.missed, 3);
    assert.equal(events[0]!.data.oldest_available_id, base + 6);
    assert.deepEqual(events.slice(1).map((e) => Number(e.id)), [6, 7, 8, 9, 10].map((n) => base + n));
    client.close();
  });

  test('the query form ?lastEventId= resumes too, and an id from an earlier run replays the ring', async () => {
    const latest = stream.latestId;
    const fromQuery = await SseClient.open(`${url}?lastEventId=${latest - 1}`);
    assert.deepEqual((await fromQuery.waitFor(1)).map((e) => Number(e.id)), [latest]);
    const fromFuture = await SseClient.open(url, { 'last-event-id': String(latest + 1000) });
    const events = await fromFuture.waitFor(6);
    assert.equal(events[0]!.event, 'missed');
    assert.equal(events[0]!.data.missed, null);
    assert.equal(events.length, 6);
    fromQuery.close();
    fromFuture.close();
  });

  test('an id from an earlier run gets a missed notice and the whole ring; ids keep increasing across runs', async () => {
    const earlier = stream.latestId;
    const restartedBus = new EventBus();
    const restarted = new EventStream({ bus: restartedBus, ringSize: 5 });
    const restartedServer = http.createServer((req, res) => restarted.handle(req, res));
    await new Promise<void>((resolve) => restartedServer.listen(0, '127.0.0.1', () => resolve()));
    try {
      restartedBus.publish(connect(1));
      restartedBus.publish(connect(2));
      const port = (restartedServer.address() as net.AddressInfo).port;
      const client = await SseClient.open(`http://127.0.0.1:${port}/api/events`, { 'last-event-id': String(earlier) });
      const events = await client.waitFor(3);
      assert.equal(events[0]!.event, 'missed');
      assert.equal(events[0]!.data.missed, null);
      assert.deepEqual(events.slice(1).map((e) => Number(e.id)), [restarted.latestId - 1, restarted.latestId]);
      assert.ok(restarted.latestId > earlier, 'a later run must hand out larger ids');
      client.close();
    } finally {
      restarted.close();
      restartedServer.closeAllConnections();
      await new Promise((resolve) => restartedServer.close(resolve));
    }
  });

  for (const given of ['abc', '-5', '99999999999999999999', '1.5']) {
    test(`a Last-Event-ID that is not an event id (${given}) gets a missed notice and the whole ring`, async () => {
      const latest = stream.latestId;
      const client = await SseClient.open(url, { 'last-event-id': given });
      try {
        const events = await client.waitFor(6);
        assert.equal(events[0]!.event, 'missed');
        assert.equal(events[0]!.data.last_event_id, null);
        assert.equal(events[0]!.data.missed, null);
        assert.match(String(events[0]!.data.message), /not an event id/);
        assert.deepEqual(events.slice(1).map((e) => Number(e.id)), [4, 3, 2, 1, 0].map((n) => latest - n));
      } finally {
        client.close();
      }
    });
  }

  test('events the stream does not carry (auth_fail, frame_error) take no id', async () => {
    const client = await SseClient.open(url);
    const before = stream.latestId;
    bus.publish({ type: 'auth_fail', code: 'invalid_authkey', role: 'boss', at: 1 });
    bus.publish({ type: 'frame_error', code: 'invalid_json', at: 1 });
    bus.publish(connect(99));
    const [event] = await client.waitFor(1);
    assert.equal(Number(event!.id), before + 1);
    client.close();
  });

  test('keep-alive comments are sent while idle', async () => {
    const client = await SseClient.open(url);
    await waitUntil(async () => client.raw.includes(': keep-alive'), 3000);
    client.close();
  });

  test('a non-reading client is dropped past the byte bound; a reading one keeps every event', async () => {
    const reader = await SseClient.open(url);
    const stuck = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    stuck.on('error', () => undefined);
    await new Promise<void>((resolve) => stuck.once('connect', () => resolve()));
    stuck.pause();
    stuck.write('GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitUntil(async () => stream.clientCount === 2);
    const droppedBefore = stream.droppedSlowClients;
    const big: RelayEvent = { type: 'message', msg_id: 'm', from: node, to: 'x'.repeat(16 * 1024), delivered: [], failed: [], queued: [], bytes: 1, route_ms: 0, at: 1 };
    let published = 0;
    while (stream.droppedSlowClients === droppedBefore && published < 5000) {
      for (let i = 0; i < 3; i++, published++) bus.publish(big); // 48 KB: under the bound per burst
      await reader.waitFor(published, 10_000);
    }
    assert.equal(stream.droppedSlowClients, droppedBefore + 1, `not dropped after ${published} events of 16 KB`);
    assert.equal(stream.clientCount, 1);
    assert.equal(reader.events.length, published);
    reader.close();
    stuck.destroy();
  });

  test('close() ends open streams and later requests get 503', async () => {
    const client = await SseClient.open(url);
    stream.close();
    await client.ended;
    const after = await fetch(url);
    assert.equal(after.status, 503);
    assert.equal(((await after.json()) as { code: string }).code, 'shutting_down');
  });
});

describe('event stream ring in a cluster (two nodes sharing events directly)', () => {
  const node = { id: 'employee-1', role: 'employee' as const, name: 'N', tags: ['t'] };
  const connect = (at: number): RelayEvent => ({ type: 'connect', node, reconnected: false, at });

  async function serve(stream: EventStream): Promise<{ url: string; close(): Promise<void> }> {
    const server = http.createServer((req, res) => stream.handle(req, res));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
    return {
      url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/api/events`,
      async close() {
        stream.close();
        server.closeAllConnections();
        await new Promise((resolve) => server.close(resolve));
      },
    };
  }

  test('a position from one node resumes exactly on the other; a ring that no longer reaches back gets a missed notice', async () => {
    const busA = new EventBus();
    const busB = new EventBus();
    let a: EventStream | null = null;
    let b: EventStream | null = null;
    a = new EventStream({ bus: busA, ringSize: 6, cluster: { nodeId: 'node-a', share: (event, seq) => b?.receiveShared('node-a', seq, event) } });
    b = new EventStream({ bus: busB, ringSize: 6, cluster: { nodeId: 'node-b', share: (event, seq) => a?.receiveShared('node-b', seq, event) } });
    const onA = await serve(a);
    const onB = await serve(b);
    try {
      const first = await SseClient.open(onA.url);
      busA.publish(connect(1));
      busB.publish(connect(2));
      const seen = await first.waitFor(2);
      first.close();
      assert.match(seen[1]!.id!, /^node-a:\d+,node-b:\d+$/);
      busB.publish(connect(3));
      busA.publish(connect(4));
      busB.publish(connect(5));
      const resumed = await SseClient.open(onB.url, { 'last-event-id': seen[1]!.id! });
      const events = await resumed.waitFor(3);
      assert.deepEqual(events.map((e) => [e.event, e.data.at]), [['connect', 3], ['connect', 4], ['connect', 5]]);
      resumed.close();

      // Four more events push node-b's ring (6) past what the first stream left at.
      for (const at of [6, 7, 8, 9]) (at % 2 === 0 ? busA : busB).publish(connect(at));
      const late = await SseClient.open(onB.url, { 'last-event-id': seen[1]!.id! });
      const lateEvents = await late.waitFor(7);
      assert.equal(lateEvents[0]!.event, 'missed');
      assert.equal(lateEvents[0]!.data.last_event_id, seen[1]!.id);
      assert.equal(lateEvents[0]!.data.missed, 1);
      assert.deepEqual(lateEvents.slice(1).map((e) => e.data.at), [4, 5, 6, 7, 8, 9]);
      late.close();

      const unreadable = await SseClient.open(onB.url, { 'last-event-id': '12345' });
      const unreadableEvents = await unreadable.waitFor(7);
      assert.equal(unreadableEvents[0]!.event, 'missed');
      assert.equal(unreadableEvents[0]!.data.last_event_id, null);
      unreadable.close();
    } finally {
      await onA.close();
      await onB.close();
    }
  });
});
