// Idempotent send: the ack of each (sender, msg_id) within the dedupe window, so a repeated
// msg_id is answered with the first ack instead of being routed again. Entries live for
// minutes, so each is kept as small as it can be: the ack's text without its timestamp, in a
// Map, with arrival times in a parallel ring for expiry and eviction (oldest first).

import type { DeliveryAckFrame } from './protocol';

export type AckBody = Pick<DeliveryAckFrame, 'msg_id' | 'delivered' | 'failed' | 'queued'>;

/** `{"type":"delivery_ack",…,"queued":[…]` — an ack without its timestamp and closing brace. */
export function ackPrefix(ack: AckBody): string {
  return (
    `{"type":"delivery_ack","msg_id":${JSON.stringify(ack.msg_id)},"delivered":${JSON.stringify(ack.delivered)},` +
    `"failed":${JSON.stringify(ack.failed)},"queued":${JSON.stringify(ack.queued ?? [])}`
  );
}

export function finishAck(prefix: string, duplicate: boolean, now = Date.now()): string {
  return `${prefix}${duplicate ? ',"duplicate":true' : ''},"timestamp":${now}}`;
}

type Stored = string | Promise<string>;

export class DedupeCache {
  private readonly acks = new Map<string, Stored>();
  private keys: string[] = [];
  private times: number[] = [];
  private head = 0;

  constructor(
    private readonly windowMs: number,
    private readonly maxEntries: number,
  ) {}

  get size(): number {
    return this.acks.size;
  }

  get enabled(): boolean {
    return this.windowMs > 0 && this.maxEntries > 0;
  }

  private static key(senderId: string, msgId: string): string {
    return `${senderId}\n${msgId}`;
  }

  /** The first ack's prefix, or a promise of it while that ack waits for a disk write. */
  find(senderId: string, msgId: string): Stored | undefined {
    return this.acks.get(DedupeCache.key(senderId, msgId));
  }

  remember(senderId: string, msgId: string, at: number, ack: Stored): void {
    if (!this.enabled) return;
    const key = DedupeCache.key(senderId, msgId);
    if (this.acks.has(key)) return;
    this.acks.set(key, ack);
    this.keys.push(key);
    this.times.push(at);
    if (this.acks.size > this.maxEntries) this.dropOldest();
    if (typeof ack !== 'string') {
      ack.then(
        (prefix) => {
          if (this.acks.get(key) === ack) this.acks.set(key, prefix);
        },
        () => {
          if (this.acks.get(key) === ack) this.acks.delete(key);
        },
      );
    }
  }

  /** Drops entries older than the window. */
  expire(now: number): void {
    while (this.head < this.keys.length && now - this.times[this.head]! > this.windowMs) this.dropOldest();
  }

  private dropOldest(): void {
    if (this.head >= this.keys.length) return;
    this.acks.delete(this.keys[this.head]!);
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.keys.length) {
      this.keys = this.keys.slice(this.head);
      this.times = this.times.slice(this.head);
      this.head = 0;
    }
  }
}
