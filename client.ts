// RelayClient: a boss or employee connection that stays up. It authenticates, keeps and reuses
// its identity, reconnects with backoff, and keeps every send until the relay acknowledges it.
// Each send carries a msg_id, and unacknowledged sends are written again after a reconnect:
// the relay's dedupe (PROTOCOL.md part B) answers a repeat with the first ack instead of routing
// it twice, so a message is delivered once even when its ack was lost with the connection.

import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';
import { DedupeCache } from './lib/dedupe-cache';
import { IdentityFileError, readIdentityFile, writeIdentityFile, type StoredIdentity } from './lib/identity-file';
import {
  checkTarget,
  CLOSE_CODES,
  decodeFrame,
  type AuthFrame,
  type AuthOkFrame,
  type DeliveryAckFrame,
  type DeliveryUpdateFrame,
  type EmployeeStatus,
  type ErrorFrame,
  type ForwardedMessageFrame,
  type IdentityCredentials,
  type MessageFrame,
  type Priority,
  type ProtocolErrorCode,
  type Role,
  type ServerFrame,
  type StatusAckFrame,
  type StatusFrame,
  type SystemFrame,
  type TaskDoneFrame,
  type Target,
} from './lib/protocol';

export type * from './lib/protocol';
export type { StoredIdentity } from './lib/identity-file';

export interface RelayClientOptions {
  /** ws://HOST:PORT/ws, or wss:// for a relay with TLS */
  url: string;
  /**
   * For wss://: the PEM certificate(s) to trust instead of the system's CAs, e.g. a relay's
   * self-signed certificate. Env NODE_EXTRA_CA_CERTS adds to the system's CAs instead.
   */
  ca?: string | Buffer;
  role: Role;
  /** Required for a boss; optional for an employee (checked when given). */
  authkey?: string;
  /** The registration key of a relay started with --employee-key. */
  employeeKey?: string;
  /** Employee registration (and profile updates on reconnect). */
  name?: string;
  tags?: string[];
  meta?: Record<string, unknown>;
  /** Reconnect as this identity instead of registering a new one. */
  identity?: IdentityCredentials;
  /** JSON file {id,key,role}: read at start when it exists, written (mode 0600) after registering. */
  identityFile?: string;
  /**
   * Register a new identity that the relay forgets when the connection ends (nothing left
   * behind by a one-off client); each reconnect registers a new one. Not with identity/identityFile.
   */
  ephemeral?: boolean;
  /** First reconnect delay; doubles per failed attempt up to maxReconnectDelayMs, with jitter. Default 1000. */
  minReconnectDelayMs?: number;
  /** Default 30000. */
  maxReconnectDelayMs?: number;
  /** Most sends waiting for their ack; send() rejects with code pending_full beyond it. Default 1000. */
  maxPendingSends?: number;
  /**
   * A message with the same from_id and msg_id as one passed on within this window is dropped
   * (the relay may route a message twice after a crash). 0 = pass every copy on. Default 600000.
   */
  inboundDedupeWindowMs?: number;
  /** Most (from_id, msg_id) pairs remembered for that; the oldest are forgotten first. Default 10000. */
  inboundDedupeMaxEntries?: number;
  /** How often to send {"type":"ping"}; a connection silent for two intervals is dropped and redialled. 0 = off. Default 20000. */
  heartbeatIntervalMs?: number;
  /** Reject a send with code ack_timeout when no ack came this long after send(). Default 0: wait (across reconnects). */
  ackTimeoutMs?: number;
  /** Give up on a connection attempt that is not authenticated after this long, and retry. Default 10000. */
  authTimeoutMs?: number;
  /** An employee's tasks at once for dispatch (part C), sent at auth. Default: the relay's (1). */
  capacity?: number;
}

export interface SendOptions {
  /** Default: a new uuid. A repeat within the relay's dedupe window is not routed again. */
  msgId?: string;
  /** Keep the message for offline known targets (part B). */
  queue?: boolean;
  /** How long a queued copy may wait, ms. */
  ttlMs?: number;
  /** Part C: high, normal (default) or low; orders every queue. */
  priority?: Priority;
  /** Part C: the msg_id of the task this message answers (reply() sets it). */
  inReplyTo?: string;
  /** Part C: lease of a task sent to any:<tag>, ms (else the relay's --task-timeout). */
  taskTimeoutMs?: number;
}

export interface RequestOptions extends Omit<SendOptions, 'inReplyTo'> {
  /** Reject with code timeout when no reply came this long after request(). Default 0: wait. */
  timeoutMs?: number;
}

export type ClientStatus = 'connecting' | 'open' | 'authenticated' | 'reconnecting' | 'closed';

export interface StatusChange {
  status: ClientStatus;
  /** reconnecting: the failed attempts so far and the wait before the next. */
  attempt?: number;
  delayMs?: number;
  /** reconnecting/closed: the close code and reason of the socket that ended, when there was one. */
  code?: number;
  reason?: string;
}

export type RelayClientErrorCode =
  | ProtocolErrorCode
  | 'pending_full'
  | 'closed'
  | 'ack_timeout'
  | 'replaced'
  | 'identity_file_invalid'
  | 'connection_failed'
  /** request(): the relay gave the task up (no_available_target, its attempts used up, or it expired waiting). */
  | 'task_failed'
  /** request(): no reply within timeoutMs. */
  | 'timeout';

export class RelayClientError extends Error {
  constructor(
    readonly code: RelayClientErrorCode,
    message: string,
    /** The relay's error frame, when the relay said it. */
    readonly frame?: ErrorFrame,
  ) {
    super(message);
    this.name = 'RelayClientError';
  }
}

export interface RelayClientEvents {
  message: ForwardedMessageFrame;
  delivery_update: DeliveryUpdateFrame;
  /** Part C: the relay's answer to setAvailability(). */
  status_ack: StatusAckFrame;
  system: SystemFrame;
  status: StatusChange;
  /** Error frames no send claims, connection failures, and the error that stopped the client. */
  error: ErrorFrame | Error;
  /** Every frame from the relay, as received. */
  frame: ServerFrame;
}

type Listener<E extends keyof RelayClientEvents> = (value: RelayClientEvents[E]) => void;

interface PendingSend {
  msgId: string;
  text: string;
  /** Written on the current connection (and not yet answered). */
  written: boolean;
  resolve: (ack: DeliveryAckFrame) => void;
  reject: (error: RelayClientError) => void;
  timer: NodeJS.Timeout | null;
}

/** Auth rejections that no retry can fix. server_full and auth_throttled are worth retrying. */
const RETRYABLE_AUTH_CODES: ReadonlySet<string> = new Set(['server_full', 'auth_throttled', 'cluster_unavailable']);
/** Errors after auth that mean "not now": every unacknowledged send is written again after a pause. */
const RETRY_SEND_CODES: ReadonlySet<string> = new Set(['rate_limited', 'cluster_unavailable']);
/** Errors the relay gives in answer to a message frame. */
const MESSAGE_ERROR_CODES: ReadonlySet<string> = new Set([
  'invalid_to',
  'invalid_msg_id',
  'invalid_frame',
  'invalid_json',
  'payload_too_large',
  'too_many_targets',
]);
const MAX_MSG_ID_LENGTH = 256;
const CLOSE_WAIT_MS = 2000;

export class RelayClient {
  private readonly options: Required<
    Pick<
      RelayClientOptions,
      | 'minReconnectDelayMs'
      | 'maxReconnectDelayMs'
      | 'maxPendingSends'
      | 'heartbeatIntervalMs'
      | 'ackTimeoutMs'
      | 'authTimeoutMs'
      | 'inboundDedupeWindowMs'
      | 'inboundDedupeMaxEntries'
    >
  > &
    RelayClientOptions;
  private readonly listeners = new Map<keyof RelayClientEvents, Set<(value: never) => void>>();
  private readonly pending = new Map<string, PendingSend>();
  /** (from_id, msg_id) of the messages passed on lately, kept across reconnects. */
  private readonly inboundSeen: DedupeCache;
  private ws: WebSocket | null = null;
  private state: ClientStatus = 'closed';
  private started = false;
  private stopped = false;
  private credentials: StoredIdentity | null = null;
  private fromFile = false;
  private lastAuthOk: AuthOkFrame | null = null;
  /** Why the client stopped by itself, for calls made afterwards. */
  private failure: RelayClientError | null = null;
  private attempt = 0;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private authTimer: NodeJS.Timeout | null = null;
  private rateLimitTimer: NodeJS.Timeout | null = null;
  private retryAfterMs = 0;
  private lastReceivedAt = 0;
  private connectWaiters: { resolve: (ok: AuthOkFrame) => void; reject: (error: RelayClientError) => void }[] = [];
  /** request() calls waiting for their reply, by msg_id. */
  private readonly requests = new Map<string, { resolve: (reply: ForwardedMessageFrame) => void; reject: (error: RelayClientError) => void; timer: NodeJS.Timeout | null }>();
  private statusWaiters: { resolve: (ack: StatusAckFrame) => void; reject: (error: RelayClientError) => void }[] = [];
  /** What this employee last declared, sent again after a reconnect. */
  private declared: { status?: EmployeeStatus; capacity?: number } = {};

  constructor(options: RelayClientOptions) {
    this.options = {
      minReconnectDelayMs: 1000,
      maxReconnectDelayMs: 30_000,
      maxPendingSends: 1000,
      heartbeatIntervalMs: 20_000,
      ackTimeoutMs: 0,
      authTimeoutMs: 10_000,
      inboundDedupeWindowMs: 600_000,
      inboundDedupeMaxEntries: 10_000,
      ...options,
    };
    this.inboundSeen = new DedupeCache(this.options.inboundDedupeWindowMs, this.options.inboundDedupeMaxEntries);
    if (options.identity) this.credentials = { ...options.identity, role: options.role };
    if (options.ephemeral && (options.identity || options.identityFile)) {
      throw new TypeError('An ephemeral client registers a new identity each time: leave out identity and identityFile.');
    }
  }

  /** connecting, open, authenticated, reconnecting or closed. */
  get status(): ClientStatus {
    return this.state;
  }

  /** The identity this client authenticates as, once known. */
  get identity(): StoredIdentity | null {
    return this.credentials ? { ...this.credentials } : null;
  }

  /** Sends not yet acknowledged by the relay. */
  get pendingCount(): number {
    return this.pending.size;
  }

  on<E extends keyof RelayClientEvents>(event: E, listener: Listener<E>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  off<E extends keyof RelayClientEvents>(event: E, listener: Listener<E>): void {
    this.listeners.get(event)?.delete(listener);
  }

  /** Resolves with the first auth_ok; keeps retrying unreachable relays; rejects when the auth can never succeed. */
  connect(): Promise<AuthOkFrame> {
    if (this.stopped) return Promise.reject(this.failure ?? new RelayClientError('closed', 'This client was closed; create a new RelayClient.'));
    if (this.state === 'authenticated' && this.lastAuthOk) return Promise.resolve(this.lastAuthOk);
    const waiting = new Promise<AuthOkFrame>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (!this.started) {
      this.started = true;
      void this.start();
    }
    return waiting;
  }

  /**
   * Sends one message and resolves with its delivery_ack (which may say the message failed for
   * some targets). While disconnected the send waits; after a reconnect it is written again with
   * the same msg_id.
   */
  send(to: Target, payload: unknown, options: SendOptions = {}): Promise<DeliveryAckFrame> {
    const checked = this.prepare(to, payload, options);
    if (checked instanceof RelayClientError) return Promise.reject(checked);
    return new Promise<DeliveryAckFrame>((resolve, reject) => {
      const entry: PendingSend = { msgId: checked.msg_id!, text: JSON.stringify(checked), written: false, resolve, reject, timer: null };
      if (this.options.ackTimeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.settle(entry.msgId)?.reject(
            new RelayClientError('ack_timeout', `No delivery_ack for msg_id ${entry.msgId} within ${this.options.ackTimeoutMs} ms; the relay may still deliver it.`),
          );
        }, this.options.ackTimeoutMs);
      }
      this.pending.set(entry.msgId, entry);
      if (this.canWrite()) this.write(entry);
    });
  }

  /**
   * Part C: sends a task (usually to "any:<tag>") and resolves with the message that answers it
   * (in_reply_to = its msg_id). Rejects with task_failed when the relay gives the task up, with
   * timeout after timeoutMs, or with the send's own error.
   */
  request(to: Target, payload: unknown, options: RequestOptions = {}): Promise<ForwardedMessageFrame> {
    const { timeoutMs = 0, ...sendOptions } = options;
    const msgId = sendOptions.msgId ?? randomUUID();
    if (this.requests.has(msgId)) return Promise.reject(new RelayClientError('invalid_msg_id', `A request with msg_id ${msgId} is already waiting for its reply.`));
    return new Promise<ForwardedMessageFrame>((resolve, reject) => {
      const waiter = { resolve, reject, timer: null as NodeJS.Timeout | null };
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          this.settleRequest(msgId)?.reject(new RelayClientError('timeout', `No reply to ${msgId} within ${timeoutMs} ms.`));
        }, timeoutMs);
      }
      this.requests.set(msgId, waiter);
      this.send(to, payload, { ...sendOptions, msgId }).then(
        (ack) => {
          if (ack.failed.length === 0) return;
          const reasons = ack.failed.map((f) => `${f.id} (${f.reason})`).join(', ');
          this.settleRequest(msgId)?.reject(new RelayClientError('task_failed', `The request ${msgId} could not be handed out: ${reasons}.`));
        },
        (error: RelayClientError) => this.settleRequest(msgId)?.reject(error),
      );
    });
  }

  /** Part C: answers a task (or any message): a message to its sender carrying in_reply_to, kept for the sender if it is offline. */
  reply(message: Pick<ForwardedMessageFrame, 'msg_id' | 'from_id'>, payload: unknown, options: Omit<SendOptions, 'inReplyTo'> = {}): Promise<DeliveryAckFrame> {
    return this.send(message.from_id, payload, { queue: true, ...options, inReplyTo: message.msg_id });
  }

  /**
   * Part C: ends a dispatched task without a reply (failed: the relay hands it to someone else
   * until its attempts are used up). False when not connected: the task's lease ended with the
   * connection anyway.
   */
  done(message: Pick<ForwardedMessageFrame, 'msg_id'>, options: { failed?: boolean } = {}): boolean {
    if (!this.canWrite()) return false;
    const frame: TaskDoneFrame = { type: 'task_done', msg_id: message.msg_id };
    if (options.failed) frame.failed = true;
    this.ws!.send(JSON.stringify(frame));
    return true;
  }

  /** Part C (employees): declares status and/or capacity; resolves with the relay's status_ack. Kept and sent again after a reconnect. */
  setAvailability(change: { status?: EmployeeStatus; capacity?: number }): Promise<StatusAckFrame> {
    if (this.stopped) return Promise.reject(this.failure ?? new RelayClientError('closed', 'This client was closed; create a new RelayClient.'));
    if (change.status === undefined && change.capacity === undefined) {
      return Promise.reject(new RelayClientError('invalid_status', 'setAvailability needs a status, a capacity or both.'));
    }
    if (change.status !== undefined) this.declared.status = change.status;
    if (change.capacity !== undefined) this.declared.capacity = change.capacity;
    return new Promise<StatusAckFrame>((resolve, reject) => {
      this.statusWaiters.push({ resolve, reject });
      if (this.canWrite()) this.writeStatus(change);
    });
  }

  private writeStatus(change: { status?: EmployeeStatus; capacity?: number }): void {
    const frame: StatusFrame = { type: 'status' };
    if (change.status !== undefined) frame.status = change.status;
    if (change.capacity !== undefined) frame.capacity = change.capacity;
    this.ws!.send(JSON.stringify(frame));
  }

  private settleRequest(msgId: string) {
    const waiter = this.requests.get(msgId);
    if (!waiter) return undefined;
    this.requests.delete(msgId);
    if (waiter.timer) clearTimeout(waiter.timer);
    return waiter;
  }

  /** Stops reconnecting, rejects unacknowledged sends with code closed, and closes the socket. */
  async close(): Promise<void> {
    if (this.stopped && !this.ws) return;
    this.stopped = true;
    const error = new RelayClientError('closed', 'The client was closed before this completed.');
    this.shutDown(error);
    const ws = this.ws;
    if (ws && ws.readyState !== WebSocket.CLOSED) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => ws.terminate(), CLOSE_WAIT_MS);
        ws.once('close', () => {
          clearTimeout(timer);
          resolve();
        });
        ws.close(1000, 'client closing');
      });
    }
    this.setStatus({ status: 'closed' });
  }

  // ---- sending -------------------------------------------------------------------------------

  private prepare(to: Target, payload: unknown, options: SendOptions): MessageFrame | RelayClientError {
    if (this.stopped) return this.failure ?? new RelayClientError('closed', 'This client was closed; create a new RelayClient to send.');
    const target = checkTarget(to);
    if (!target.ok) return new RelayClientError(target.error.code, target.error.message);
    const msgId = options.msgId ?? randomUUID();
    if (typeof msgId !== 'string' || msgId === '' || msgId.length > MAX_MSG_ID_LENGTH) {
      return new RelayClientError('invalid_msg_id', `msgId must be a non-empty string of at most ${MAX_MSG_ID_LENGTH} characters.`);
    }
    if (this.pending.has(msgId)) return new RelayClientError('invalid_msg_id', `A send with msg_id ${msgId} is already waiting for its ack.`);
    if (options.ttlMs !== undefined && !(Number.isFinite(options.ttlMs) && options.ttlMs > 0)) {
      return new RelayClientError('invalid_frame', 'ttlMs must be a positive number of milliseconds.');
    }
    if (this.pending.size >= this.options.maxPendingSends) {
      return new RelayClientError(
        'pending_full',
        `${this.pending.size} sends are already waiting for their ack (maxPendingSends); wait for some to settle and send again.`,
      );
    }
    const frame: MessageFrame = { type: 'message', to, msg_id: msgId };
    if (payload !== undefined) frame.payload = payload;
    if (options.queue !== undefined) frame.queue = options.queue;
    if (options.ttlMs !== undefined) frame.ttl_ms = options.ttlMs;
    if (options.priority !== undefined) frame.priority = options.priority;
    if (options.inReplyTo !== undefined) frame.in_reply_to = options.inReplyTo;
    if (options.taskTimeoutMs !== undefined) frame.task_timeout_ms = options.taskTimeoutMs;
    try {
      JSON.stringify(frame);
    } catch (error) {
      return new RelayClientError('invalid_json', `The payload cannot be sent as JSON: ${(error as Error).message}.`);
    }
    return frame;
  }

  private canWrite(): boolean {
    return this.state === 'authenticated' && this.rateLimitTimer === null && this.ws?.readyState === WebSocket.OPEN;
  }

  private write(entry: PendingSend): void {
    entry.written = true;
    this.ws!.send(entry.text);
  }

  /** Writes, in order, every send not yet written on this connection. */
  private flush(): void {
    for (const entry of this.pending.values()) {
      if (!this.canWrite()) return;
      if (!entry.written) this.write(entry);
    }
  }

  private settle(msgId: string): PendingSend | undefined {
    const entry = this.pending.get(msgId);
    if (!entry) return undefined;
    this.pending.delete(msgId);
    if (entry.timer) clearTimeout(entry.timer);
    return entry;
  }

  // ---- connection lifecycle ------------------------------------------------------------------

  private async start(): Promise<void> {
    const file = this.options.identityFile;
    if (file && !this.credentials) {
      try {
        const stored = await readIdentityFile(file);
        if (stored && stored.role !== this.options.role) {
          throw new IdentityFileError(`Identity file ${file} holds a ${stored.role} identity, but this client's role is ${this.options.role}: use another file.`);
        }
        if (stored) {
          this.credentials = stored;
          this.fromFile = true;
        }
      } catch (error) {
        this.fail(new RelayClientError('identity_file_invalid', (error as Error).message));
        return;
      }
    }
    if (!this.stopped) this.dial();
  }

  private dial(): void {
    this.reconnectTimer = null;
    this.setStatus({ status: 'connecting' });
    const ws = new WebSocket(this.options.url, { handshakeTimeout: this.options.authTimeoutMs, ...(this.options.ca === undefined ? {} : { ca: this.options.ca }) });
    this.ws = ws;
    ws.on('open', () => ws === this.ws && this.onOpen());
    ws.on('message', (data, isBinary) => ws === this.ws && this.onData(data.toString(), isBinary));
    ws.on('ping', () => (this.lastReceivedAt = Date.now()));
    ws.on('error', (error) => ws === this.ws && this.emit('error', new RelayClientError('connection_failed', `Connection to ${this.options.url} failed: ${error.message}`)));
    ws.on('close', (code, reason) => ws === this.ws && this.onClose(code, reason.toString()));
  }

  private onOpen(): void {
    this.setStatus({ status: 'open' });
    this.lastReceivedAt = Date.now();
    this.authTimer = setTimeout(() => this.ws?.terminate(), this.options.authTimeoutMs);
    this.ws!.send(JSON.stringify(this.authFrame()));
  }

  private authFrame(): AuthFrame {
    const { role, authkey, employeeKey, name, tags, meta } = this.options;
    const frame: AuthFrame = { type: 'auth', role };
    if (authkey !== undefined) frame.authkey = authkey;
    if (employeeKey !== undefined) frame.employee_key = employeeKey;
    if (this.options.ephemeral) frame.ephemeral = true;
    else if (this.credentials) frame.identity = { id: this.credentials.id, key: this.credentials.key };
    if (name !== undefined) frame.name = name;
    if (tags !== undefined) frame.tags = tags;
    if (meta !== undefined) frame.meta = meta;
    const capacity = this.declared.capacity ?? this.options.capacity;
    if (capacity !== undefined && role === 'employee') frame.capacity = capacity;
    return frame;
  }

  private onClose(code: number, reason: string): void {
    this.ws = null;
    this.stopTimers();
    for (const entry of this.pending.values()) entry.written = false;
    if (this.stopped) {
      this.setStatus({ status: 'closed', code, reason });
      return;
    }
    if (code === CLOSE_CODES.banned) {
      this.fail(new RelayClientError('banned', 'This employee was banned by an admin; it can reconnect once unbanned (DELETE /employees/:id/ban).'));
      return;
    }
    if (code === CLOSE_CODES.replaced) {
      this.fail(new RelayClientError('replaced', 'Another connection authenticated as this identity and replaced this one; not reconnecting, so the two do not keep replacing each other.'));
      return;
    }
    const base = Math.min(this.options.maxReconnectDelayMs, this.options.minReconnectDelayMs * 2 ** Math.min(this.attempt, 30));
    const delayMs = Math.max(Math.round(base / 2 + (Math.random() * base) / 2), this.retryAfterMs);
    this.retryAfterMs = 0;
    this.attempt++;
    this.setStatus({ status: 'reconnecting', attempt: this.attempt, delayMs, code, reason });
    this.reconnectTimer = setTimeout(() => this.dial(), delayMs);
  }

  /** Stops for good: the error goes to connect() callers, every pending send and 'error' listeners. */
  private fail(error: RelayClientError): void {
    this.stopped = true;
    this.failure = error;
    this.shutDown(error);
    this.emit('error', error);
    this.ws?.close(1000, 'client stopping');
    this.setStatus({ status: 'closed' });
  }

  private shutDown(error: RelayClientError): void {
    this.stopTimers();
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    for (const waiter of this.connectWaiters.splice(0)) waiter.reject(error);
    for (const msgId of [...this.pending.keys()]) this.settle(msgId)?.reject(error);
    for (const msgId of [...this.requests.keys()]) this.settleRequest(msgId)?.reject(error);
    for (const waiter of this.statusWaiters.splice(0)) waiter.reject(error);
  }

  private stopTimers(): void {
    for (const timer of [this.heartbeatTimer, this.authTimer, this.rateLimitTimer]) if (timer) clearTimeout(timer);
    this.heartbeatTimer = this.authTimer = this.rateLimitTimer = null;
  }

  private startHeartbeat(): void {
    const interval = this.options.heartbeatIntervalMs;
    if (interval <= 0) return;
    this.heartbeatTimer = setInterval(() => {
      const ws = this.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      if (Date.now() - this.lastReceivedAt > 2 * interval) {
        ws.terminate();
        return;
      }
      ws.send('{"type":"ping"}');
    }, interval);
  }

  // ---- inbound frames ------------------------------------------------------------------------

  private onData(text: string, isBinary: boolean): void {
    this.lastReceivedAt = Date.now();
    const decoded = isBinary ? null : decodeFrame(text);
    if (!decoded || !decoded.ok) {
      this.emit('error', new RelayClientError('invalid_frame', 'The relay sent a frame that is not a JSON object with a "type"; ignored it.'));
      return;
    }
    const frame = decoded.value as unknown as ServerFrame;
    this.emit('frame', frame);
    if (frame.type === 'message' && this.isRepeat(frame)) return;
    switch (frame.type) {
      case 'auth_ok':
        void this.onAuthOk(frame);
        return;
      case 'delivery_ack':
        this.settle(String(frame.msg_id))?.resolve(frame);
        return;
      case 'error':
        this.onErrorFrame(frame);
        return;
      case 'message':
        if (frame.in_reply_to !== undefined) this.settleRequest(frame.in_reply_to)?.resolve(frame);
        this.emit('message', frame);
        return;
      case 'delivery_update':
        if (frame.status === 'failed' || (frame.status === 'expired' && frame.dispatch !== undefined)) {
          this.settleRequest(frame.msg_id)?.reject(new RelayClientError('task_failed', `The relay gave up the request ${frame.msg_id} (${frame.status}).`));
        }
        this.emit('delivery_update', frame);
        return;
      case 'status_ack':
        this.statusWaiters.shift()?.resolve(frame);
        this.emit('status_ack', frame);
        return;
      case 'system':
        this.emit('system', frame);
        return;
      default:
        return;
    }
  }

  /**
   * True for a message already passed on within the window: the relay delivers at least once,
   * and after a crash it may route a message again that it had already delivered.
   */
  private isRepeat(frame: ForwardedMessageFrame): boolean {
    const seen = this.inboundSeen;
    if (!seen.enabled || typeof frame.from_id !== 'string' || typeof frame.msg_id !== 'string') return false;
    const now = Date.now();
    seen.expire(now);
    if (seen.find(frame.from_id, frame.msg_id) !== undefined) return true;
    seen.remember(frame.from_id, frame.msg_id, now, 0);
    return false;
  }

  private async onAuthOk(frame: AuthOkFrame): Promise<void> {
    const ws = this.ws;
    if (this.authTimer) clearTimeout(this.authTimer);
    this.authTimer = null;
    const known = this.credentials;
    this.credentials = { id: frame.id, key: frame.key, role: frame.role };
    const file = this.options.identityFile;
    if (file && (known?.id !== frame.id || known.key !== frame.key || !this.fromFile)) {
      try {
        await writeIdentityFile(file, this.credentials);
        this.fromFile = true;
      } catch (error) {
        this.emit('error', new RelayClientError('identity_file_invalid', `Could not save the identity to ${file}: ${(error as Error).message}. It will not survive a restart.`));
      }
    }
    if (ws !== this.ws || this.stopped) return;
    this.lastAuthOk = frame;
    this.attempt = 0;
    this.setStatus({ status: 'authenticated' });
    this.startHeartbeat();
    for (const waiter of this.connectWaiters.splice(0)) waiter.resolve(frame);
    // The relay starts every connection idle: declare again what was declared (capacity went
    // with the auth), once per setAvailability() still waiting for its ack.
    if (frame.role === 'employee' && (this.declared.status !== undefined || this.statusWaiters.length > 0)) {
      for (let i = 0; i < Math.max(1, this.statusWaiters.length); i++) this.writeStatus({ ...this.declared });
    }
    this.flush();
  }

  private onErrorFrame(frame: ErrorFrame): void {
    if (this.state !== 'authenticated') {
      this.onAuthRejected(frame);
      return;
    }
    if (RETRY_SEND_CODES.has(frame.code)) {
      this.pauseForRateLimit(frame.retry_after_ms ?? 1000);
      return;
    }
    const owner = this.errorOwner(frame);
    if (owner) {
      this.settle(owner.msgId)?.reject(new RelayClientError(frame.code, frame.message, frame));
      return;
    }
    this.emit('error', frame);
  }

  /**
   * The send an error answers: named by msg_id when the relay gives it; otherwise (relays that
   * do not echo it) the oldest written send, or for payload_too_large the largest one.
   */
  private errorOwner(frame: ErrorFrame): PendingSend | undefined {
    if (frame.msg_id !== undefined) return this.pending.get(frame.msg_id);
    if (!MESSAGE_ERROR_CODES.has(frame.code)) return undefined;
    let owner: PendingSend | undefined;
    for (const entry of this.pending.values()) {
      if (!entry.written) continue;
      if (frame.code !== 'payload_too_large') return entry;
      if (!owner || entry.text.length > owner.text.length) owner = entry;
    }
    return owner;
  }

  /** The relay dropped a frame for going too fast: hold writes, then write every unacked send again (dedupe makes that safe). */
  private pauseForRateLimit(retryAfterMs: number): void {
    if (this.rateLimitTimer) return;
    for (const entry of this.pending.values()) entry.written = false;
    this.rateLimitTimer = setTimeout(() => {
      this.rateLimitTimer = null;
      this.flush();
    }, Math.max(1, retryAfterMs));
  }

  private onAuthRejected(frame: ErrorFrame): void {
    if (RETRYABLE_AUTH_CODES.has(frame.code)) {
      this.retryAfterMs = frame.retry_after_ms ?? 0;
      this.emit('error', frame);
      return; // the relay closes the socket; onClose schedules the retry
    }
    let message = frame.message;
    if (frame.code === 'identity_not_found' && this.fromFile) {
      message = `The relay does not know identity ${this.credentials?.id ?? ''} from ${this.options.identityFile ?? ''} (was its data dir reset?). Remove that file to register as a new identity.`;
    }
    this.fail(new RelayClientError(frame.code, message, frame));
  }

  // ---- events --------------------------------------------------------------------------------

  private setStatus(change: StatusChange): void {
    if (this.state === change.status && change.status === 'closed') return;
    this.state = change.status;
    this.emit('status', change);
  }

  private emit<E extends keyof RelayClientEvents>(event: E, value: RelayClientEvents[E]): void {
    const set = this.listeners.get(event) as Set<Listener<E>> | undefined;
    if (!set) return;
    for (const listener of [...set]) listener(value);
  }
}
