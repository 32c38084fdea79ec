// queue.db: store-and-forward. A message for an offline known target is kept here until the
// target's next auth or its TTL. Entries are on disk before the sender's ack says "queued"
// (inserted in one NeDB append per tick, fsynced with --fsync), held in memory per target in
// send order (high priority before normal before low, part C), and removed in batches once delivered or expired: each removal batch is one
// NeDB append, and remove() says when its batch is on disk, so a drain can bound how much a
// crash delivers twice.

import fs from 'node:fs/promises';
import type Datastore from '@seald-io/nedb';
import type { Logger } from './logger';
import { openDatastore } from './nedb-file';
import type { Priority } from './protocol';

export interface QueuedEntry {
  _id: string;
  /** Global send order. */
  seq: number;
  target_id: string;
  from_id: string;
  msg_id: string;
  /** The messages.db record this copy belongs to. */
  record_id: string;
  /** The forwarded frame, ready to write to the target's socket. */
  frame: string;
  queued_at: number;
  expires_at: number;
  /** Part C: absent means normal. Orders the target's queue ahead of send order. */
  priority?: Priority;
}

/** 0 for high, 1 for normal, 2 for low: a target's list is sorted by rank, then seq. */
function rank(entry: QueuedEntry): number {
  return entry.priority === 'high' ? 0 : entry.priority === 'low' ? 2 : 1;
}

export type NewQueuedEntry = Omit<QueuedEntry, '_id' | 'seq'>;

/** Entries just held in memory and the promise of their reaching queue.db. */
export interface HeldEntries {
  entries: readonly QueuedEntry[];
  stored: Promise<void>;
}

interface PendingInsert {
  docs: QueuedEntry[];
  resolve: () => void;
  reject: (error: Error) => void;
}

function readEntry(doc: Record<string, unknown>): QueuedEntry | null {
  const text = (key: string) => (typeof doc[key] === 'string' ? (doc[key] as string) : null);
  const num = (key: string) => (typeof doc[key] === 'number' ? (doc[key] as number) : null);
  const [id, target, from, msgId, recordId, frame] = ['_id', 'target_id', 'from_id', 'msg_id', 'record_id', 'frame'].map(text);
  const [seq, queuedAt, expiresAt] = ['seq', 'queued_at', 'expires_at'].map(num);
  if (!id || !target || !from || !msgId || !recordId || !frame || seq === null || queuedAt === null || expiresAt === null) {
    return null;
  }
  const entry: QueuedEntry = { _id: id, seq, target_id: target, from_id: from, msg_id: msgId, record_id: recordId, frame, queued_at: queuedAt, expires_at: expiresAt };
  if (doc.priority === 'high' || doc.priority === 'low') entry.priority = doc.priority;
  return entry;
}

const NO_ENTRIES: readonly QueuedEntry[] = Object.freeze([]);

export class DeliveryQueue {
  private readonly byTarget = new Map<string, QueuedEntry[]>();
  private nextSeq = 1;
  private count = 0;
  private inserts: PendingInsert[] = [];
  private removals: string[] = [];
  private removalWaiters: (() => void)[] = [];
  /** Entries whose sender has not been answered yet: a drain stops at them, so no delivery_update precedes the ack. */
  private readonly unreleased = new Set<QueuedEntry>();
  private scheduled = false;
  private writing: Promise<void> = Promise.resolve();

  private constructor(
    private readonly db: Datastore<Record<string, unknown>>,
    private readonly filename: string,
    private readonly logger: Logger,
    private readonly fsync: boolean,
  ) {}

  static async open(filename: string, logger: Logger, options: { compactionIntervalMs: number; fsync: boolean; fileMode?: number }): Promise<DeliveryQueue> {
    const db = await openDatastore<Record<string, unknown>>(filename, logger, options.compactionIntervalMs, options.fileMode);
    const queue = new DeliveryQueue(db, filename, logger, options.fsync);
    const entries: QueuedEntry[] = [];
    for (const doc of db.getAllData()) {
      const entry = readEntry(doc);
      if (entry) entries.push(entry);
      else logger.warn('queue_entry_skipped', { reason: 'unreadable document' });
    }
    entries.sort((a, b) => a.seq - b.seq);
    for (const entry of entries) queue.hold(entry);
    queue.nextSeq = entries.length > 0 ? entries[entries.length - 1]!.seq + 1 : 1;
    return queue;
  }

  get depth(): number {
    return this.count;
  }

  /** The messages.db records that still have a queued copy here. */
  recordIds(): Set<string> {
    const ids = new Set<string>();
    for (const list of this.byTarget.values()) for (const entry of list) ids.add(entry.record_id);
    return ids;
  }

  pendingFor(targetId: string): readonly QueuedEntry[] {
    // Asked for every queueable message's online targets: no new array when there is no backlog.
    return this.byTarget.get(targetId) ?? NO_ENTRIES;
  }

  /**
   * Holds the entries behind their targets' earlier ones; `stored` resolves once they are on
   * disk. They are not handed out for delivery until release().
   */
  enqueue(newEntries: NewQueuedEntry[]): HeldEntries {
    const docs = newEntries.map((entry) => ({ ...entry, _id: `q${this.nextSeq.toString(36)}-${entry.queued_at.toString(36)}`, seq: this.nextSeq++ }));
    for (const doc of docs) {
      this.hold(doc);
      this.unreleased.add(doc);
    }
    const stored = new Promise<void>((resolve, reject) => {
      this.inserts.push({ docs, resolve, reject });
      this.schedule();
    });
    return { entries: docs, stored };
  }

  /** The senders of these entries have their answer: a drain may write them now. */
  release(entries: readonly QueuedEntry[]): void {
    for (const entry of entries) this.unreleased.delete(entry);
  }

  isReleased(entry: QueuedEntry): boolean {
    return this.unreleased.size === 0 || !this.unreleased.has(entry);
  }

  /** Entries past `max` for a target, lowest priority first and oldest first within one; the caller expires them. */
  overflow(targetId: string, max: number): QueuedEntry[] {
    const list = this.byTarget.get(targetId);
    if (!list || list.length <= max) return [];
    const excess = list.length - max;
    const out: QueuedEntry[] = [];
    for (let r = 2; r >= 0 && out.length < excess; r--) {
      for (const entry of list) {
        if (rank(entry) !== r) continue;
        out.push(entry);
        if (out.length === excess) break;
      }
    }
    return out;
  }

  /**
   * Forgets delivered or expired entries, in memory now and on disk in the next batch. Returns
   * those it still held (an entry may have expired meanwhile), and `written`, which resolves
   * once that batch is written (or has failed, which is logged: the entries come back at the
   * next start and are delivered again).
   */
  remove(entries: readonly QueuedEntry[]): { removed: QueuedEntry[]; written: Promise<void> } {
    const removed: QueuedEntry[] = [];
    const gone = new Map<string, Set<QueuedEntry>>();
    for (const entry of entries) {
      let set = gone.get(entry.target_id);
      if (!set) gone.set(entry.target_id, (set = new Set()));
      set.add(entry);
    }
    // One pass per target, in place: a drain removes hundreds of entries at a time from lists
    // of thousands, where a splice per entry would cost a copy of the list each.
    for (const [targetId, set] of gone) {
      const list = this.byTarget.get(targetId);
      if (!list) continue;
      let kept = 0;
      for (const entry of list) {
        if (set.has(entry)) {
          removed.push(entry);
          this.count--;
          this.removals.push(entry._id);
          this.unreleased.delete(entry);
        } else {
          list[kept++] = entry;
        }
      }
      list.length = kept;
      if (kept === 0) this.byTarget.delete(targetId);
    }
    const written = new Promise<void>((resolve) => this.removalWaiters.push(resolve));
    this.schedule();
    return { removed, written };
  }

  expired(now: number): QueuedEntry[] {
    const out: QueuedEntry[] = [];
    for (const list of this.byTarget.values()) {
      for (const entry of list) if (entry.expires_at <= now) out.push(entry);
    }
    return out;
  }

  flush(): Promise<void> {
    this.writing = this.writing.then(() => this.writeBatch());
    return this.writing;
  }

  async close(): Promise<void> {
    await this.flush();
    this.db.stopAutocompaction();
  }

  private hold(entry: QueuedEntry): void {
    let list = this.byTarget.get(entry.target_id);
    if (!list) this.byTarget.set(entry.target_id, (list = []));
    // Behind every entry of its priority or higher: a plain push unless it jumps lower ones.
    let at = list.length;
    while (at > 0 && rank(list[at - 1]!) > rank(entry)) at--;
    if (at === list.length) list.push(entry);
    else list.splice(at, 0, entry);
    this.count++;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  private async writeBatch(): Promise<void> {
    const inserts = this.inserts;
    const removals = this.removals;
    const removalWaiters = this.removalWaiters;
    this.inserts = [];
    this.removals = [];
    this.removalWaiters = [];
    if (inserts.length > 0) {
      try {
        await this.db.insertAsync(inserts.flatMap((insert) => insert.docs.map((doc) => ({ ...doc }))));
        if (this.fsync) await this.syncFile();
        for (const insert of inserts) insert.resolve();
      } catch (error) {
        this.logger.error('queue_write_failed', { entries: inserts.length, error: (error as Error).message });
        for (const insert of inserts) insert.reject(error as Error);
      }
    }
    if (removals.length > 0) {
      try {
        await this.db.removeAsync({ _id: { $in: removals } }, { multi: true });
      } catch (error) {
        this.logger.error('queue_remove_failed', { entries: removals.length, error: (error as Error).message });
      }
    }
    for (const resolve of removalWaiters) resolve();
  }

  private async syncFile(): Promise<void> {
    const handle = await fs.open(this.filename, 'r+');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
}
