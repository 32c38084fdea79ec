// The msg_id dedupe window shared by every node: <cluster>:dedupe:<sender>:<msg_id>, claimed
// with SET NX PX <window> ("pending" while its node routes it), then holding the first ack's
// outcome fields, so a resend through any node is answered with that ack.

import type Redis from 'ioredis';
import type { DedupeClaim } from './cluster-link';
import type { Logger } from './logger';

/** How long a resend waits for another node still routing the same msg_id. */
const CLAIM_WAIT_MS = 3000;
const CLAIM_POLL_MS = 50;

export class SharedDedupe {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly windowMs: number,
    private readonly logger: Logger,
  ) {}

  private key(senderId: string, msgId: string): string {
    return `${this.prefix}dedupe:${senderId}:${msgId}`;
  }

  async claim(senderId: string, msgId: string): Promise<DedupeClaim> {
    const key = this.key(senderId, msgId);
    const deadline = Date.now() + CLAIM_WAIT_MS;
    for (;;) {
      const set = await this.redis.set(key, 'pending', 'PX', this.windowMs, 'NX');
      if (set === 'OK') return { kind: 'new' };
      const value = await this.redis.get(key);
      if (value !== null && value !== 'pending') return { kind: 'seen', outcome: value };
      // Another node is routing this very msg_id now (or it just expired): wait for its ack.
      if (Date.now() > deadline) throw new Error('another node is still routing this msg_id');
      await new Promise((resolve) => setTimeout(resolve, CLAIM_POLL_MS).unref());
    }
  }

  /** Records the first ack's outcome fields for a claimed msg_id. */
  settle(senderId: string, msgId: string, outcome: string): void {
    this.redis.set(this.key(senderId, msgId), outcome, 'KEEPTTL', 'XX').catch((error: Error) => {
      this.logger.warn('cluster_dedupe_failed', { error: error.message });
    });
  }

  /** Gives a claim back (the message was not routed). */
  release(senderId: string, msgId: string): void {
    this.redis.del(this.key(senderId, msgId)).catch(() => undefined);
  }
}
