// GET /api/events: the relay's events as Server-Sent Events. Each event is serialised once and
// written to every open stream; a bounded ring of recent events answers `Last-Event-ID` on
// reconnect. A stream whose unsent buffer passes a bound is dropped instead of buffered, so a
// client that stops reading costs bounded memory and never slows publishing (which is
// synchronous on the routing path). Data is metadata only: message payloads never appear.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { EventBus, RelayEvent, RelayEventType } from './events';

export interface EventStreamOptions {
  bus: EventBus;
  /** Recent events kept for Last-Event-ID resume. Default 1000. */
  ringSize?: number;
  /** Unsent bytes on one stream past which that stream is dropped. Default 1 MiB. */
  maxBufferedBytes?: number;
  /** Interval between keep-alive comments, ms. Default 15000. */
  keepAliveMs?: number;
  /** Reconnect delay suggested to clients (`retry:`), ms. Default 2000. */
  retryMs?: number;
  /**
   * In a cluster: this node's id, and where each of its streamed events goes with its sequence
   * number so the other nodes' rings hold it too (the other nodes' events come in through
   * receiveShared). Event ids then name a position per origin node (see clusterEventId).
   */
  cluster?: { nodeId: string; share(event: RelayEvent, seq: number): void };
}

/** The event types sent on the stream (auth failures and frame errors are counted in /metrics instead). */
export const STREAMED_EVENT_TYPES: readonly RelayEventType[] = [
  'connect',
  'disconnect',
  'message',
  'delivery_update',
  'ban',
  'unban',
  'health',
  'availability',
  'task_assigned',
  'task_done',
  'task_retried',
  'task_failed',
  'identity_removed',
  'key_rotated',
];

/** Sent first on a resumed stream when events it asked for are no longer in the ring. */
export interface MissedEventsNotice {
  type: 'missed';
  /** The Last-Event-ID the client sent; null when it was not an event id (e.g. "abc", "-5"). */
  last_event_id: number | string | null;
  /**
   * The oldest id still held; events between last_event_id and it were lost (null: ring empty).
   * In a cluster: the oldest sequence held of each origin node that lost events, as `node:seq,…`.
   */
  oldest_available_id: number | string | null;
  /** How many events were lost, when known (null when the relay restarted since). */
  missed: number | null;
  message: string;
}

interface RingEntry {
  /** The event id; in a cluster, the origin node's own sequence number. */
  id: number;
  /** The node the event happened on (cluster only; null on a single relay). */
  origin: string | null;
  event: RelayEvent;
  /**
   * The SSE frame, made only once some stream needs it: routing must not pay for it. In a
   * cluster it lacks the `id:` line, which depends on the stream's position (per origin node).
   */
  text: string | null;
}

/** What one node has heard of one origin node's events: every sequence number from `from` to `last`. */
interface HeardRange {
  from: number;
  last: number;
  /** This node stopped listening since `last`: what came after it is unknown until the next event shows it. */
  stale: boolean;
}

const DEFAULT_RING_SIZE = 1000;
const DEFAULT_MAX_BUFFERED_BYTES = 1024 * 1024;
const DEFAULT_KEEP_ALIVE_MS = 15_000;
const DEFAULT_RETRY_MS = 2000;

function frameText(id: number | null, type: string, data: unknown): string {
  // JSON.stringify never emits a raw newline, so the data fits on one `data:` line.
  return `${id === null ? '' : `id: ${id}\n`}event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
}

function entryText(entry: RingEntry): string {
  return (entry.text ??= frameText(entry.id, entry.event.type, entry.event));
}

/** A cluster entry's frame without its `id:` line. */
function entryBody(entry: RingEntry): string {
  return (entry.text ??= frameText(null, entry.event.type, entry.event));
}

const NODE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/**
 * A cluster event id: the stream's position per origin node, `node-0:123,node-1:77` (node ids
 * hold neither `:` nor `,`), so any node can resume it. At most one entry per node.
 */
export function clusterEventId(position: ReadonlyMap<string, number>): string {
  let id = '';
  for (const [node, seq] of position) id += `${id === '' ? '' : ','}${node}:${seq}`;
  return id;
}

/** Parses a cluster Last-Event-ID: null when absent or empty, 'invalid' when it is not one this relay sends. */
export function parseClusterEventId(raw: string | string[] | null | undefined): Map<string, number> | 'invalid' | null {
  const value = (Array.isArray(raw) ? raw[0] : raw)?.trim();
  if (value === undefined || value === '') return null;
  if (value.length > 8192) return 'invalid';
  const position = new Map<string, number>();
  for (const part of value.split(',')) {
    const colon = part.lastIndexOf(':');
    const node = part.slice(0, colon);
    const seq = part.slice(colon + 1);
    if (colon < 0 || !NODE_ID.test(node) || !/^\d{1,16}$/.test(seq) || position.has(node)) return 'invalid';
    const n = Number(seq);
    if (!Number.isSafeInteger(n)) return 'invalid';
    position.set(node, n);
  }
  return position;
}

/**
 * Parses a Last-Event-ID value: null when absent or empty (a fresh stream), 'invalid' when it is
 * not a non-negative whole number the relay could have sent.
 */
export function parseLastEventId(raw: string | string[] | null | undefined): number | 'invalid' | null {
  const value = (Array.isArray(raw) ? raw[0] : raw)?.trim();
  if (value === undefined || value === '') return null;
  if (!/^\d{1,16}$/.test(value)) return 'invalid';
  const id = Number(value);
  return Number.isSafeInteger(id) ? id : 'invalid';
}

export class EventStream {
  private readonly streamed = new Set<RelayEventType>(STREAMED_EVENT_TYPES);
  private readonly ring: (RingEntry | undefined)[];
  private ringStart = 0;
  private ringCount = 0;
  /** Ids start from the clock (µs), so they keep increasing across relay restarts. */
  private readonly firstId: number;
  private lastId: number;
  private readonly clients = new Set<ServerResponse>();
  private readonly unsubscribe: () => void;
  private readonly keepAlive: NodeJS.Timeout;
  private readonly maxBufferedBytes: number;
  private readonly retryMs: number;
  private closed = false;
  private readonly cluster: NonNullable<EventStreamOptions['cluster']> | null;
  /** Cluster only: per origin node, the run of its sequence numbers this node has heard without a gap. */
  private readonly heard = new Map<string, HeardRange>();
  /** Streams dropped for not reading fast enough, since start. */
  droppedSlowClients = 0;

  constructor(options: EventStreamOptions) {
    const ringSize = options.ringSize ?? DEFAULT_RING_SIZE;
    if (!Number.isInteger(ringSize) || ringSize < 1) throw new RangeError(`ringSize must be a positive integer, got ${ringSize}`);
    this.ring = new Array<RingEntry | undefined>(ringSize);
    this.maxBufferedBytes = options.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
    this.retryMs = options.retryMs ?? DEFAULT_RETRY_MS;
    this.firstId = Date.now() * 1000;
    this.lastId = this.firstId;
    this.cluster = options.cluster ?? null;
    if (this.cluster) this.heard.set(this.cluster.nodeId, { from: this.firstId + 1, last: this.firstId, stale: false });
    this.unsubscribe = options.bus.subscribe((event) => this.onEvent(event));
    this.keepAlive = setInterval(() => this.broadcast(': keep-alive\n\n'), options.keepAliveMs ?? DEFAULT_KEEP_ALIVE_MS);
    this.keepAlive.unref();
  }

  /** Open streams right now. */
  get clientCount(): number {
    return this.clients.size;
  }

  /** Id of the newest event (before the first, the id the first will follow). */
  get latestId(): number {
    return this.lastId;
  }

  /** Serves GET /api/events. The caller has already checked read access. */
  handle(req: IncomingMessage, res: ServerResponse): void {
    if (this.closed) {
      res.writeHead(503, { 'content-type': 'application/json; charset=utf-8', 'retry-after': '2' });
      res.end(JSON.stringify({ error: 'shutting_down', code: 'shutting_down', message: 'The relay is shutting down; reconnect in a moment.' }));
      return;
    }
    const url = new URL(req.url ?? '/', 'http://relay.local');
    // EventSource sends the header on reconnect; the query form lets a fresh page resume too.
    const rawLastEventId = req.headers['last-event-id'] ?? url.searchParams.get('lastEventId');
    const lastEventId = this.cluster ? parseClusterEventId(rawLastEventId) : parseLastEventId(rawLastEventId);
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-store',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    req.socket.setNoDelay(true);
    res.write(`retry: ${this.retryMs}\n: connected, latest event id ${this.cluster ? this.heardId() : this.lastId}\n\n`);
    if (lastEventId instanceof Map) this.replayCluster(res, lastEventId, String(rawLastEventId));
    else if (this.cluster && lastEventId === 'invalid') this.replayCluster(res, null, null);
    else if (lastEventId !== null) this.replay(res, lastEventId);
    this.clients.add(res);
    res.on('close', () => this.clients.delete(res));
  }

  /** Ends every stream and stops listening (relay shutdown). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribe();
    clearInterval(this.keepAlive);
    for (const res of this.clients) res.end();
    this.clients.clear();
  }

  /** Another node's event, with its sequence number there (cluster only). */
  receiveShared(origin: string, seq: number, event: RelayEvent): void {
    if (this.cluster === null || this.closed || origin === this.cluster.nodeId || !this.streamed.has(event.type)) return;
    this.record(origin, seq, event);
  }

  /** This node stopped hearing the other nodes' events (cluster only): it no longer vouches for what they did since. */
  stopHearing(): void {
    for (const [node, range] of this.heard) if (node !== this.cluster?.nodeId) range.stale = true;
  }

  private onEvent(event: RelayEvent): void {
    if (!this.streamed.has(event.type)) return;
    const id = ++this.lastId;
    if (this.cluster !== null) {
      this.cluster.share(event, id);
      this.record(this.cluster.nodeId, id, event);
      return;
    }
    const entry: RingEntry = { id, origin: null, event, text: null };
    this.push(entry);
    if (this.clients.size > 0) this.broadcast(entryText(entry));
  }

  /** Cluster: keeps an event of `origin` in the ring and streams it with the node's position as its id. */
  private record(origin: string, seq: number, event: RelayEvent): void {
    const heard = this.heard.get(origin);
    if (heard === undefined) this.heard.set(origin, { from: seq, last: seq, stale: false });
    else if (seq <= heard.last) return; // a repeat, or an origin's earlier run: already past it
    else {
      // A gap (this node was not subscribed, or the origin did not publish): nothing before is whole.
      if (seq !== heard.last + 1) heard.from = seq;
      heard.last = seq;
      heard.stale = false;
    }
    const entry: RingEntry = { id: seq, origin, event, text: null };
    this.push(entry);
    if (this.clients.size > 0) this.broadcast(`id: ${this.heardId()}\n${entryBody(entry)}`);
  }

  /** The position of a stream that has had every event this node heard. */
  private heardId(): string {
    let id = '';
    for (const [node, range] of this.heard) if (range.last >= range.from && !range.stale) id += `${id === '' ? '' : ','}${node}:${range.last}`;
    return id;
  }

  private push(entry: RingEntry): void {
    const size = this.ring.length;
    if (this.ringCount < size) {
      this.ring[(this.ringStart + this.ringCount) % size] = entry;
      this.ringCount++;
    } else {
      this.ring[this.ringStart] = entry;
      this.ringStart = (this.ringStart + 1) % size;
    }
  }

  private broadcast(text: string): void {
    for (const res of this.clients) this.write(res, text);
  }

  private write(res: ServerResponse, text: string): void {
    if (res.writableLength > this.maxBufferedBytes) {
      // The client is not reading: drop it rather than grow the buffer. EventSource will
      // reconnect with Last-Event-ID and resume from the ring if it comes back in time.
      this.clients.delete(res);
      this.droppedSlowClients++;
      res.destroy();
      return;
    }
    res.write(text);
  }

  private replay(res: ServerResponse, lastEventId: number | 'invalid'): void {
    const oldest = this.ringCount > 0 ? this.ring[this.ringStart]!.id : null;
    if (lastEventId === 'invalid') {
      // Nothing can be resumed from it: say so, as for an id too old, rather than stay silent.
      this.notifyMissed(res, { last_event_id: null, oldest_available_id: oldest, missed: null }, 'The Last-Event-ID sent is not an event id, so what was missed is unknown; reload the lists to resynchronise.');
      this.sendRing(res, 0);
      return;
    }
    if (lastEventId < this.firstId || lastEventId > this.lastId) {
      // The client saw an earlier run of the relay (or another relay): send all this run holds.
      this.notifyMissed(res, { last_event_id: lastEventId, oldest_available_id: oldest, missed: null }, 'The relay restarted since your last event; events before this point were not kept.');
      this.sendRing(res, 0);
      return;
    }
    if (oldest !== null && lastEventId < oldest - 1) {
      this.notifyMissed(res, { last_event_id: lastEventId, oldest_available_id: oldest, missed: oldest - 1 - lastEventId }, 'Some events were older than the replay buffer and are lost; reload the lists to resynchronise.');
    }
    this.sendRing(res, lastEventId);
  }

  /**
   * Cluster resume: sends the ring's events past the stream's position for their origin node. A
   * `missed` notice comes first when, for some origin, the events right after that position are
   * not all here (pushed out of the ring, or this node did not hear them), or the id is unreadable.
   */
  private replayCluster(res: ServerResponse, position: Map<string, number> | null, raw: string | null): void {
    const size = this.ring.length;
    if (position === null) {
      this.notifyMissed(res, { last_event_id: null, oldest_available_id: null, missed: null }, 'The Last-Event-ID sent is not an event id, so what was missed is unknown; reload the lists to resynchronise.');
    } else {
      // The oldest event held of each origin within the run this node heard without a gap.
      const oldest = new Map<string, number>();
      for (let i = 0; i < this.ringCount; i++) {
        const entry = this.ring[(this.ringStart + i) % size]!;
        const heard = this.heard.get(entry.origin!);
        if (heard !== undefined && entry.id >= heard.from && !oldest.has(entry.origin!)) oldest.set(entry.origin!, entry.id);
      }
      let lost = 0;
      let unknown = false;
      const lostFrom = new Map<string, number>();
      for (const [node, seen] of position) {
        const heard = this.heard.get(node);
        if (heard === undefined || heard.stale) {
          // The stream saw events of a node this one did not hear (or stopped hearing): what
          // came after them is unknown here.
          unknown = true;
          continue;
        }
        if (seen >= heard.last) continue;
        const first = oldest.get(node) ?? heard.last + 1;
        if (seen >= first - 1) continue;
        lostFrom.set(node, first);
        if (seen >= heard.from - 1) lost += first - 1 - seen;
        else unknown = true;
      }
      if (lostFrom.size > 0 || unknown) {
        this.notifyMissed(
          res,
          { last_event_id: raw, oldest_available_id: lostFrom.size > 0 ? clusterEventId(lostFrom) : null, missed: unknown ? null : lost },
          'Some events were older than the replay buffer (or the node restarted) and are lost; reload the lists to resynchronise.',
        );
      }
    }
    const running = new Map(position ?? []);
    for (let i = 0; i < this.ringCount; i++) {
      const entry = this.ring[(this.ringStart + i) % size]!;
      const seen = running.get(entry.origin!);
      if (seen !== undefined && entry.id <= seen) continue;
      running.set(entry.origin!, entry.id);
      res.write(`id: ${clusterEventId(running)}\n${entryBody(entry)}`);
    }
  }

  private notifyMissed(res: ServerResponse, fields: Omit<MissedEventsNotice, 'type' | 'message'>, message: string): void {
    const notice: MissedEventsNotice = { type: 'missed', ...fields, message };
    res.write(frameText(null, 'missed', notice));
  }

  private sendRing(res: ServerResponse, afterId: number): void {
    const size = this.ring.length;
    for (let i = 0; i < this.ringCount; i++) {
      const entry = this.ring[(this.ringStart + i) % size]!;
      if (entry.id > afterId) res.write(entryText(entry));
    }
  }
}
