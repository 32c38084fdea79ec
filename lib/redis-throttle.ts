// The auth-failure throttle across a cluster (lib/auth-throttle.ts is the per-node part). A
// guesser the balancer spreads over the nodes must be throttled as on one relay, so wrong
// secrets are also counted in Redis, per address and secret guessed at, in the same fixed
// window. Only failures cost anything: the counts of one tick go in one MULTI (SET NX PX, INCRBY,
// PTTL per key), and the node whose count crosses the limit announces it on the control channel,
// so every node refuses that (address, secret) locally, without asking Redis on any auth. The
// wrong auth is answered once its count is in (at most COUNT_WAIT_MS later): the guesser's next
// try, on whichever node, meets the count as it would on one relay.

import { createHash } from 'node:crypto';
import type Redis from 'ioredis';
import { AUTH_FAILURE_WINDOW_MS, type BlockSink, type GuessTarget, type SharedFailureCount } from './auth-throttle';
import type { Logger } from './logger';

/** The control-channel announcement of a reached limit. */
export interface ThrottledMessage {
  t: 'throttled';
  address: string;
  target: string;
  retry_after_ms: number;
}

/** Longest a wrong auth's answer waits for its count to reach Redis. */
const COUNT_WAIT_MS = 1000;

interface PendingCount {
  address: string;
  target: GuessTarget;
  count: number;
}

export class SharedThrottle implements SharedFailureCount {
  private readonly pending = new Map<string, PendingCount>();
  /** The write of the counts gathered this tick; null when none is scheduled. */
  private flushing: Promise<void> | null = null;
  private sink: BlockSink | null = null;
  private limit = 0;

  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly publish: (message: ThrottledMessage) => Promise<unknown>,
    private readonly logger: Logger,
  ) {}

  /** Where reached limits go (this node's AuthThrottle), and the limit the nodes share. */
  attach(limit: number, sink: BlockSink): void {
    this.limit = limit;
    this.sink = sink;
  }

  /** Counts one wrong guess, sent to Redis with the others of this tick; resolves once counted (and announced). */
  count(address: string, target: GuessTarget): Promise<void> {
    if (this.sink === null || this.limit <= 0) return Promise.resolve();
    const key = this.key(address, target);
    const pending = this.pending.get(key);
    if (pending) pending.count++;
    else this.pending.set(key, { address, target, count: 1 });
    this.flushing ??= new Promise<void>((resolve) => setImmediate(resolve)).then(() => this.flush());
    return Promise.race([this.flushing, new Promise<void>((resolve) => setTimeout(resolve, COUNT_WAIT_MS).unref())]);
  }

  /** Another node (or this one) announced a reached limit. */
  heard(message: Partial<Record<keyof ThrottledMessage, unknown>>): void {
    const { address, target, retry_after_ms: retryAfterMs } = message;
    if (typeof address !== 'string' || typeof target !== 'string' || typeof retryAfterMs !== 'number' || !isGuessTarget(target)) return;
    if (retryAfterMs > 0) this.sink?.(address, target, Math.min(retryAfterMs, AUTH_FAILURE_WINDOW_MS));
  }

  /** The key's name is a digest: the address and an identity id come from the client. */
  private key(address: string, target: GuessTarget): string {
    return `${this.prefix}auth-fail:${createHash('sha256').update(`${address}\n${target}`).digest('base64url')}`;
  }

  private async flush(): Promise<void> {
    this.flushing = null;
    const batch = [...this.pending];
    this.pending.clear();
    const multi = this.redis.multi();
    for (const [key, { count }] of batch) multi.set(key, 0, 'PX', AUTH_FAILURE_WINDOW_MS, 'NX').incrby(key, count).pttl(key);
    try {
      const results = await multi.exec();
      if (!results) return;
      const announced: Promise<unknown>[] = [];
      batch.forEach(([, { address, target, count }], index) => {
        const total = Number(results[index * 3 + 1]?.[1]);
        const ttl = Number(results[index * 3 + 2]?.[1]);
        if (total < this.limit || ttl <= 0) return;
        // Past the limit in the cluster: refused here at once (also when the announcement was
        // missed), and announced once per window, by the node whose counts crossed it.
        this.sink?.(address, target, ttl);
        if (total - count < this.limit) announced.push(this.publish({ t: 'throttled', address, target, retry_after_ms: ttl }));
      });
      await Promise.all(announced);
    } catch (error) {
      // The node's own count still throttles; the cluster's is back with Redis.
      this.logger.warn('auth_throttle_count_failed', { error: (error as Error).message });
    }
  }
}

function isGuessTarget(target: string): target is GuessTarget {
  return target === 'authkey' || target === 'employee_key' || target.startsWith('identity:');
}
