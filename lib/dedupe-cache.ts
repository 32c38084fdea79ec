// Idempotent send: the ack of each (sender, msg_id) within the dedupe window, so a repeated
// msg_id is answered with the first ack instead of being routed again. Bounded in age and in
// count; entries are kept in arrival order, so expiry and eviction pop from the front.

import type { DeliveryAckFrame } from './protocol';

export type AckBody = Pick<DeliveryAckFrame, 'msg_id' | 'delivered' | 'failed' | 'queued'>;

interface Entry {
  at: number;
  /** Resolves once the first ack is known (a queued message acks after its disk write). */
  ack: AckBody | Promise<AckBody>;
}

export class DedupeCache {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly windowMs: number,
    private readonly maxEntries: number,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get enabled(): boolean {
    return this.windowMs > 0 && this.maxEntries > 0;
  }

  private static key(senderId: string, msgId: string): string {
    return `${senderId}\n${msgId}`;
  }

  find(senderId: string, msgId: string, now: number): AckBody | Promise<AckBody> | undefined {
    const entry = this.entries.get(DedupeCache.key(senderId, msgId));
    if (!entry || now - entry.at > this.windowMs) return undefined;
    return entry.ack;
  }

  remember(senderId: string, msgId: string, at: number, ack: AckBody | Promise<AckBody>): void {
    if (!this.enabled) return;
    const key = DedupeCache.key(senderId, msgId);
    this.entries.delete(key);
    this.entries.set(key, { at, ack });
    if (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next();
      if (!oldest.done) this.entries.delete(oldest.value);
    }
    if (typeof (ack as Promise<AckBody>).then === 'function') {
      void (ack as Promise<AckBody>).then((settled) => {
        const current = this.entries.get(key);
        if (current && current.ack === ack) current.ack = settled;
      }, () => this.entries.delete(key));
    }
  }

  /** Drops entries older than the window. */
  expire(now: number): void {
    for (const [key, entry] of this.entries) {
      if (now - entry.at <= this.windowMs) break;
      this.entries.delete(key);
    }
  }
}
