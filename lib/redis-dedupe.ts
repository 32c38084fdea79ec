// The msg_id dedupe window shared by every node: <cluster>:dedupe:<sender>:<msg_id>, claimed
// with SET NX PX <window> ("pending" while its node routes it), then holding the first ack's
// outcome fields, so a resend through any node is answered with that ack. Claims, outcomes and
// releases ride in the node's per-turn pipeline (lib/redis-batch.ts).

import type { DedupeClaim } from './cluster-link';
import type { RedisBatch } from './redis-batch';

/** How long a resend waits for another node still routing the same msg_id. */
const CLAIM_WAIT_MS = 3000;
const CLAIM_POLL_MS = 50;
const NEW: DedupeClaim = Object.freeze({ kind: 'new' });

export class SharedDedupe {
  constructor(
    private readonly batch: RedisBatch,
    private readonly prefix: string,
    private readonly windowMs: number,
  ) {}

  private key(senderId: string, msgId: string): string {
    return `${this.prefix}dedupe:${senderId}:${msgId}`;
  }

  claim(senderId: string, msgId: string): Promise<DedupeClaim> {
    const key = this.key(senderId, msgId);
    // Claims the key, or reads what it holds, in one step; the usual answer needs no more.
    return this.batch.claim(key, this.windowMs).then((value) => (value === null ? NEW : value === 'pending' ? this.waitForOther(key) : { kind: 'seen', outcome: value }));
  }

  /** Another node is routing this very msg_id now: wait for its ack (or for the key to free). */
  private async waitForOther(key: string): Promise<DedupeClaim> {
    const deadline = Date.now() + CLAIM_WAIT_MS;
    for (;;) {
      if (Date.now() > deadline) throw new Error('another node is still routing this msg_id');
      await new Promise((resolve) => setTimeout(resolve, CLAIM_POLL_MS).unref());
      const value = await this.batch.claim(key, this.windowMs);
      if (value === null) return NEW;
      if (value !== 'pending') return { kind: 'seen', outcome: value };
    }
  }

  /** Records the first ack's outcome fields for a claimed msg_id. */
  settle(senderId: string, msgId: string, outcome: string): void {
    this.batch.settle(this.key(senderId, msgId), outcome, 'cluster_dedupe_failed');
  }

  /** Gives a claim back (the message was not routed). */
  release(senderId: string, msgId: string): void {
    this.batch.delete(this.key(senderId, msgId), 'cluster_dedupe_failed');
  }
}
