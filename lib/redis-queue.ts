// Store-and-forward in the cluster store: a list per target (<cluster>:queue:<id>) in send
// order, and <cluster>:queue-expiry (target → its earliest expiry) so any node can expire due
// copies on time. The copies' ends are reported through `report` (delivery_update to senders).

import type Redis from 'ioredis';
import type { QueuedOutcome, SharedQueuedEntry } from './cluster-link';
import type { NewQueuedEntry } from './delivery-queue';
import type { Logger } from './logger';
import { isPlainObject } from './protocol';
import { DEPTH_SCRIPT, ENQUEUE_SCRIPT, EXPIRE_SCRIPT } from './redis-scripts';

/** Targets whose due copies one node expires per heartbeat. */
const EXPIRE_BATCH = 100;

export class SharedQueue {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
    private readonly nodeId: string,
    private readonly maxPerTarget: number,
    private readonly logger: Logger,
    private readonly report: (outcome: QueuedOutcome) => void,
  ) {}

  private listKey(target: string): string {
    return `${this.prefix}queue:${target}`;
  }

  private get expiryKey(): string {
    return `${this.prefix}queue-expiry`;
  }

  /** Appends the copies in order; resolves once Redis has them. The oldest past the cap expire. */
  async enqueue(entries: readonly NewQueuedEntry[]): Promise<void> {
    const byTarget = new Map<string, NewQueuedEntry[]>();
    for (const entry of entries) {
      const list = byTarget.get(entry.target_id);
      if (list) list.push(entry);
      else byTarget.set(entry.target_id, [entry]);
    }
    const multi = this.redis.multi();
    for (const [target, list] of byTarget) {
      const earliest = Math.min(...list.map((entry) => entry.expires_at));
      const texts = list.map((entry) => JSON.stringify({ ...entry, origin: this.nodeId } satisfies SharedQueuedEntry));
      multi.eval(ENQUEUE_SCRIPT, 2, this.listKey(target), this.expiryKey, target, this.maxPerTarget, earliest, ...texts);
    }
    const results = await multi.exec();
    const failed = results?.find(([error]) => error !== null);
    if (!results || failed) throw failed?.[0] ?? new Error('the queue write was not run');
    for (const [, dropped] of results) this.reportExpired(dropped);
  }

  /** Expires copies past their TTL for targets that have not come back (any node may; each copy once). */
  async expireDue(): Promise<void> {
    const due = await this.redis.zrangebyscore(this.expiryKey, '-inf', Date.now(), 'LIMIT', 0, EXPIRE_BATCH);
    for (const target of due) {
      this.reportExpired(await this.redis.eval(EXPIRE_SCRIPT, 2, this.listKey(target), this.expiryKey, target, Date.now()));
    }
  }

  /** How many queued copies the store holds for every target together. */
  async depth(): Promise<number> {
    return Number(await this.redis.eval(DEPTH_SCRIPT, 1, this.expiryKey, `${this.prefix}queue:`));
  }

  /** The messages.db records `target` already has copies of (a second migration skips them). */
  async recordIds(target: string): Promise<Set<string>> {
    const ids = new Set<string>();
    for (const text of await this.redis.lrange(this.listKey(target), 0, -1)) {
      const entry = readSharedEntry(text);
      if (entry) ids.add(entry.record_id);
    }
    return ids;
  }

  /** Takes every copy for `target` out, in send order. */
  async take(target: string): Promise<SharedQueuedEntry[]> {
    const key = this.listKey(target);
    const results = await this.redis.multi().lrange(key, 0, -1).del(key).zrem(this.expiryKey, target).exec();
    const listed = results?.[0]?.[1];
    if (!Array.isArray(listed)) return [];
    const entries: SharedQueuedEntry[] = [];
    for (const text of listed) {
      const entry = typeof text === 'string' ? readSharedEntry(text) : null;
      if (entry) entries.push(entry);
      else this.logger.warn('queue_entry_skipped', { reason: 'unreadable entry', target });
    }
    // Stable: within one priority the send order stays.
    return entries.sort((a, b) => rank(a) - rank(b));
  }

  /** Puts copies that could not be written back at the head, in their order. */
  async giveBack(target: string, entries: readonly SharedQueuedEntry[]): Promise<void> {
    if (entries.length === 0) return;
    const earliest = Math.min(...entries.map((entry) => entry.expires_at));
    // LPUSH puts each value at the head in turn: push the last first so the first ends up first.
    await this.redis
      .multi()
      .lpush(this.listKey(target), ...entries.map((entry) => JSON.stringify(entry)).reverse())
      .zadd(this.expiryKey, 'LT', earliest, target)
      .exec();
  }

  private reportExpired(texts: unknown): void {
    if (!Array.isArray(texts)) return;
    for (const text of texts) {
      const entry = typeof text === 'string' ? readSharedEntry(text) : null;
      if (entry === null) continue;
      const { origin, record_id, msg_id, from_id, target_id } = entry;
      this.report({ origin, record_id, msg_id, from_id, target_id, status: 'expired' });
    }
  }
}

function readSharedEntry(text: string): SharedQueuedEntry | null {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    return null;
  }
  if (!isPlainObject(doc)) return null;
  const { target_id, from_id, msg_id, record_id, frame, queued_at, expires_at, origin, priority } = doc;
  if (
    typeof target_id !== 'string' ||
    typeof from_id !== 'string' ||
    typeof msg_id !== 'string' ||
    typeof record_id !== 'string' ||
    typeof frame !== 'string' ||
    typeof queued_at !== 'number' ||
    typeof expires_at !== 'number' ||
    typeof origin !== 'string'
  ) {
    return null;
  }
  const entry: SharedQueuedEntry = { target_id, from_id, msg_id, record_id, frame, queued_at, expires_at, origin };
  if (priority === 'high' || priority === 'low') entry.priority = priority;
  return entry;
}

/** 0 for high, 1 for normal, 2 for low: a drain writes by rank, then in send order (as queue.db does). */
function rank(entry: SharedQueuedEntry): number {
  return entry.priority === 'high' ? 0 : entry.priority === 'low' ? 2 : 1;
}
