// The WebSocket edge: accepts upgrades on the ws path, greets, enforces the auth timeout and
// the per-connection limits (frame size, message rate, unauthenticated sockets, wrong secrets
// per address: lib/auth-throttle.ts), decodes frames and hands them to the router. It also
// runs the liveness sweep: protocol-level pings, terminating silent peers and peers stuck
// behind a full send buffer.

import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type RawData, type WebSocket } from 'ws';
import { AUTH_FAILURE_WINDOW_MS, AuthThrottle, describeTarget, guessTargets, type SharedFailureCount } from './auth-throttle';
import type { EventBus } from './events';
import type { Logger } from './logger';
import { normaliseOrigin, type ResolvedOptions } from './options';
import { CLOSE_CODES, decodeFrame } from './protocol';
import type { Router } from './router';
import { Session } from './session';
import { WriteBatch } from './write-batch';

const HELLO_SCHEMA = {
  type: 'auth',
  role: 'boss|employee',
  authkey: 'required for boss',
  name: 'required when role=employee and first-time register',
  tags: 'required string[] when role=employee and first-time register',
  health_report: { type: 'health_report', valid: 'boolean', details: 'optional object' },
  identity: { id: 'optional reconnect id', key: 'optional reconnect key' },
};

const SESSION = Symbol('session');
type SessionSocket = WebSocket & { [SESSION]: Session };

export class WsGateway {
  private readonly wss: WebSocketServer;
  private readonly sessions = new Set<Session>();
  private readonly authThrottle: AuthThrottle;
  private unauthenticated = 0;
  private readonly sweepTimer: NodeJS.Timeout | null;
  private readonly helloText: string;
  private readonly listeners = this.makeListeners();
  private readonly writeBatch = new WriteBatch();
  bytesIn = 0;
  /** Bytes sent by sessions that have closed; open sessions hold their own count. */
  private closedBytesOut = 0;

  constructor(
    private readonly options: ResolvedOptions,
    private readonly router: Router,
    private readonly bus: EventBus,
    private readonly logger: Logger,
  ) {
    // Frames up to twice the limit are read and answered with payload_too_large, keeping the
    // connection; anything larger is refused by ws from its header, before it is buffered.
    const hardLimit = Math.max(2 * options.maxPayloadBytes, options.maxPayloadBytes + 64 * 1024);
    this.wss = new WebSocketServer({ noServer: true, maxPayload: hardLimit, clientTracking: false, perMessageDeflate: false });
    this.authThrottle = new AuthThrottle(options.maxAuthFailures, options.throttleLoopback);
    this.helloText = JSON.stringify({ type: 'hello', message: 'Please authenticate', schema: HELLO_SCHEMA });
    this.sweepTimer = options.pingIntervalMs > 0 ? setInterval(() => this.sweep(), options.pingIntervalMs) : null;
    this.sweepTimer?.unref();
  }

  /** Frame bytes sent since start. Sums the open sessions, so call it per scrape, not per message. */
  get bytesOut(): number {
    let total = this.closedBytesOut;
    for (const session of this.sessions) total += session.bytesSent;
    return total;
  }

  /** Cluster: wrong secrets are counted across the nodes too, so a guesser spread over them is throttled as on one node. */
  shareAuthFailures(shared: SharedFailureCount): void {
    this.authThrottle.share(shared);
  }

  get unauthenticatedCount(): number {
    return this.unauthenticated;
  }

  handleUpgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void {
    const path = (request.url ?? '/').split('?')[0];
    if (path !== this.options.wsPath) {
      socket.end(`HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nWebSocket endpoint is ${this.options.wsPath}\n`);
      return;
    }
    const origin = request.headers.origin;
    if (origin !== undefined && this.options.allowedOrigins.length > 0 && !this.options.allowedOrigins.includes(normaliseOrigin(origin) ?? '')) {
      // Browsers always send Origin; agents send none, so they are never refused here.
      this.logger.info('origin_refused', { origin: origin.slice(0, 200), address: request.socket.remoteAddress ?? 'unknown' });
      const body = JSON.stringify({ error: 'origin_not_allowed', code: 'origin_not_allowed', message: `Origin ${origin.slice(0, 200)} may not open WebSockets here: add it to the relay's --allowed-origins.` });
      socket.end(`HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      return;
    }
    this.wss.handleUpgrade(request, socket, head, (ws) => this.accept(ws, request.socket.remoteAddress ?? 'unknown'));
  }

  private accept(ws: WebSocket, address: string): void {
    const now = Date.now();
    const session = new Session(ws, address, now, this.writeBatch);
    this.sessions.add(session);
    this.unauthenticated++;
    // Shared listeners find their session on the socket: four closures per connection would
    // cost more memory than the session itself.
    (ws as SessionSocket)[SESSION] = session;
    ws.on('message', this.listeners.message);
    ws.on('pong', this.listeners.pong);
    ws.on('error', this.listeners.error);
    ws.on('close', this.listeners.close);
    if (this.unauthenticated > this.options.maxUnauthenticated) {
      session.sendError('server_full', 'Too many connections are waiting to authenticate; try again shortly.');
      session.close(CLOSE_CODES.serverFull, 'server_full');
      return;
    }
    session.sendText(this.helloText.slice(0, -1) + `,"timestamp":${now}}`);
    session.authTimer = setTimeout(() => {
      session.authTimer = null;
      if (!session.identity) session.close(CLOSE_CODES.authTimeout, 'Auth timeout');
    }, this.options.authTimeoutMs);
  }

  private makeListeners() {
    // `this` inside each listener is the socket (EventEmitter calls listeners on the emitter).
    const gateway = this;
    return {
      message(this: WebSocket, data: RawData, isBinary: boolean) {
        gateway.onFrame((this as SessionSocket)[SESSION], data, isBinary);
      },
      pong(this: WebSocket) {
        (this as SessionSocket)[SESSION].lastActivityAt = Date.now();
      },
      error(this: WebSocket, error: Error) {
        gateway.logger.debug('socket_error', { address: (this as SessionSocket)[SESSION].address, error: error.message });
      },
      close(this: WebSocket, code: number) {
        gateway.onClose((this as SessionSocket)[SESSION], code);
      },
    };
  }

  private onClose(session: Session, code: number): void {
    this.sessions.delete(session);
    this.closedBytesOut += session.bytesSent;
    if (session.authTimer) clearTimeout(session.authTimer);
    if (session.identity) this.router.disconnect(session, code);
    else this.unauthenticated--;
  }

  private onFrame(session: Session, data: RawData, isBinary: boolean): void {
    const startedAt = performance.now();
    const receivedAt = Date.now();
    session.lastActivityAt = receivedAt;
    const buffer = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
    this.bytesIn += buffer.length;
    if (isBinary) {
      this.frameError(session, 'invalid_json', 'Binary frames are not accepted: send each frame as UTF-8 text holding one JSON object.');
      return;
    }
    if (buffer.length > this.options.maxPayloadBytes) {
      this.frameError(session, 'payload_too_large', `Frame of ${buffer.length} bytes is over the ${this.options.maxPayloadBytes}-byte limit; send a smaller payload.`);
      return;
    }
    if (session.identity && !this.takeToken(session, receivedAt)) return;
    const decoded = decodeFrame(buffer.toString('utf8'));
    if (!decoded.ok) {
      this.frameError(session, decoded.error.code, decoded.error.message);
      return;
    }
    const frame = decoded.value;
    if (session.identity) {
      this.router.handleFrame(session, frame, { bytes: buffer.length, receivedAt, startedAt });
      return;
    }
    if (frame.type !== 'auth') {
      this.frameError(session, 'auth_required', 'Authenticate first: the first frame must be {"type":"auth",…}.');
      return;
    }
    // Refused before any secret is compared, so a guess past the limit learns nothing.
    const throttled = this.authThrottle.throttled(session.address, guessTargets(frame), receivedAt);
    if (throttled) {
      const { target, retryAfterMs } = throttled;
      session.sendError(
        'auth_throttled',
        `Too many wrong guesses at ${describeTarget(target)} from this address; check the key and try again in ${Math.ceil(retryAfterMs / 1000)} s.`,
        { retry_after_ms: retryAfterMs },
      );
      session.close(CLOSE_CODES.authRejected, 'auth_throttled');
      return;
    }
    this.router.authenticate(session, frame, (accepted, wrong) => {
      if (accepted) {
        this.unauthenticated--;
        if (session.authTimer) clearTimeout(session.authTimer);
        session.authTimer = null;
        return undefined;
      }
      if (wrong === null) return undefined;
      if (this.authThrottle.countWrong(session.address, wrong, receivedAt)) {
        this.logger.warn('auth_throttled', {
          address: session.address,
          guessed: describeTarget(wrong),
          failures: this.options.maxAuthFailures,
          window_ms: AUTH_FAILURE_WINDOW_MS,
        });
      }
      return this.authThrottle.countShared(session.address, wrong);
    });
  }

  private frameError(session: Session, code: Parameters<Session['sendError']>[0], message: string): void {
    session.sendError(code, message);
    if (this.bus.hasListeners) this.bus.publish({ type: 'frame_error', code, at: Date.now() });
  }

  /** Token bucket: `rateLimit` frames per second with a burst of one second's worth. */
  private takeToken(session: Session, now: number): boolean {
    const rate = this.options.rateLimit;
    if (rate <= 0) return true;
    if (session.tokensAt === 0) {
      session.tokens = rate;
    } else {
      session.tokens = Math.min(rate, session.tokens + ((now - session.tokensAt) * rate) / 1000);
    }
    session.tokensAt = now;
    if (session.tokens >= 1) {
      session.tokens -= 1;
      return true;
    }
    const retryAfterMs = Math.ceil(((1 - session.tokens) * 1000) / rate);
    session.sendError('rate_limited', `Over ${rate} frames per second; slow down and retry after ${retryAfterMs} ms.`, { retry_after_ms: retryAfterMs });
    return false;
  }

  /** Pings everyone; ends peers silent for two intervals or stuck behind a full buffer. */
  private sweep(): void {
    const now = Date.now();
    const silentAfter = 2 * this.options.pingIntervalMs;
    for (const session of this.sessions) {
      if (now - session.lastActivityAt > silentAfter) {
        this.logger.info('peer_silent', { id: session.identity?.id ?? null, silent_ms: now - session.lastActivityAt });
        session.ws.terminate();
        continue;
      }
      if (session.slowSince !== null) {
        if (session.ws.bufferedAmount <= this.options.maxBufferedBytes) {
          session.slowSince = null;
        } else if (now - session.slowSince > this.options.slowPeerTimeoutMs) {
          this.logger.info('peer_too_slow', { id: session.identity?.id ?? null, buffered_bytes: session.ws.bufferedAmount });
          session.ws.terminate();
          continue;
        }
      }
      session.ws.ping();
    }
    this.authThrottle.sweep(now);
  }

  /** Closes every socket with 1001 and stops the sweep. */
  closeAll(): void {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    for (const session of this.sessions) session.close(CLOSE_CODES.shuttingDown, 'Server shutting down');
  }

  /** Ends sockets that did not finish their close handshake in time. */
  terminateAll(): void {
    for (const session of this.sessions) session.ws.terminate();
  }

  get openSessions(): number {
    return this.sessions.size;
  }
}
