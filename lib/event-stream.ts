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
  last_event_id: number | null;
  /** The oldest id still held; events between last_event_id and it were lost (null: ring empty). */
  oldest_available_id: number | null;
  /** How many events were lost, when known (null when the relay restarted since). */
  missed: number | null;
  message: string;
}

interface RingEntry {
  id: number;
  event: RelayEvent;
  /** The SSE frame, made only once some stream needs it: routing must not pay for it. */
  text: string | null;
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
    const lastEventId = parseLastEventId(req.headers['last-event-id'] ?? url.searchParams.get('lastEventId'));
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-store',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    req.socket.setNoDelay(true);
    res.write(`retry: ${this.retryMs}\n: connected, latest event id ${this.lastId}\n\n`);
    if (lastEventId !== null) this.replay(res, lastEventId);
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

  private onEvent(event: RelayEvent): void {
    if (!this.streamed.has(event.type)) return;
    const id = ++this.lastId;
    const entry: RingEntry = { id, event, text: null };
    const size = this.ring.length;
    if (this.ringCount < size) {
      this.ring[(this.ringStart + this.ringCount) % size] = entry;
      this.ringCount++;
    } else {
      this.ring[this.ringStart] = entry;
      this.ringStart = (this.ringStart + 1) % size;
    }
    if (this.clients.size > 0) this.broadcast(entryText(entry));
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
