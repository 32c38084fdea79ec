// One WebSocket connection: its identity once authenticated, liveness and slow-peer state,
// and its rate-limit bucket. Kept small: an idle connection should cost little memory.

import type { Duplex } from 'node:stream';
import WebSocket from 'ws';
import type { NodeRef } from './events';
import type { Identity } from './identity-store';
import type { WriteBatch } from './write-batch';
import { encodeSplitFrame, encodeTextFrame, type SplitText } from './ws-frame';
import type { ErrorFrame, ProtocolErrorCode, ServerFrame } from './protocol';

export class Session {
  identity: Identity | null = null;
  /** The identity as events describe it, made once at auth rather than per message. */
  ref: NodeRef | null = null;
  lastActivityAt: number;
  /** When the socket's unsent buffer first went past the bound; null while it drains fine. */
  slowSince: number | null = null;
  authTimer: NodeJS.Timeout | null = null;
  /** Token bucket for the per-connection message rate. */
  tokens = 0;
  tokensAt = 0;
  /** Bytes of the frames handed to the socket, for the bytes-out metric. */
  bytesSent = 0;
  /** Cluster: the sender's last message still waiting on the cluster store; later ones queue behind it. */
  routing: Promise<void> | null = null;

  corked = false;
  writtenInTick = 0;
  readonly socket: Duplex | undefined;

  constructor(
    readonly ws: WebSocket,
    readonly address: string,
    now: number,
    private readonly batch: WriteBatch,
  ) {
    this.lastActivityAt = now;
    // ws keeps its net.Socket private; corking it is the only way to batch writes across frames.
    this.socket = (ws as unknown as { _socket?: Duplex })._socket;
  }

  get isOpen(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  sendText(text: string): void {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    if (this.socket === undefined) {
      this.bytesSent += Buffer.byteLength(text);
      this.ws.send(text);
      return;
    }
    this.writeFrame(encodeTextFrame(text));
  }

  /**
   * A queued message: `done` is called once the socket has handed the frame to the kernel, or
   * with an error if it never will (the socket closed first).
   */
  sendQueued(text: string, done: (error?: Error | null) => void): void {
    if (this.ws.readyState !== WebSocket.OPEN) {
      process.nextTick(done, new Error('the socket is not open'));
      return;
    }
    if (this.socket === undefined) {
      this.bytesSent += Buffer.byteLength(text);
      this.ws.send(text, done);
      return;
    }
    this.writeFrame(encodeTextFrame(text), done);
  }

  /** A forwarded message: its head and tail encoded once for every target, the target id between. */
  sendSplit(split: SplitText, middle: string): void {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    if (this.socket === undefined) {
      this.sendText(split.head.toString() + middle + split.tail.toString());
      return;
    }
    this.writeFrame(encodeSplitFrame(split, middle));
  }

  /**
   * Writes a whole frame to the socket, past ws's sender: the relay never compresses, fragments
   * or sends blobs, so the sender never holds frames back that this one could overtake, and
   * ws's bufferedAmount still counts these bytes (it reads the socket's buffer).
   */
  private writeFrame(frame: Buffer, done?: (error?: Error | null) => void): void {
    this.bytesSent += frame.length;
    this.batch.hold(this);
    this.socket!.write(frame, done);
  }

  /**
   * Calls `resume` once at most `limit` bytes wait to be sent: at once, at the socket's 'drain'
   * when a write has filled it, else after a short wait (a limit below the socket's own
   * high-water mark never makes a write report it full). It may never be called once the
   * socket closes, so the caller forgets its wait on close.
   */
  whenWritable(limit: number, resume: () => void): void {
    if (this.ws.bufferedAmount <= limit) {
      setImmediate(resume);
    } else if (this.socket?.writableNeedDrain) {
      this.socket.once('drain', resume);
    } else {
      setTimeout(resume, 10).unref();
    }
  }

  send(frame: ServerFrame): void {
    this.sendText(JSON.stringify(frame));
  }

  sendError(code: ProtocolErrorCode, message: string, extra: Partial<Pick<ErrorFrame, 'retry_after_ms' | 'msg_id'>> = {}): void {
    this.send({ type: 'error', code, message, ...extra, timestamp: Date.now() });
  }

  close(code: number, reason: string): void {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      // Close reasons are limited to 123 bytes by the WebSocket protocol.
      this.ws.close(code, reason.slice(0, 120));
    }
  }
}
