// connections.db: auth, reconnect, disconnect, ban, unban, auth_fail, delete and rotate_key events. Events are
// buffered and inserted once per tick in one NeDB append; retention keeps the file bounded.
//
// Each event is a link of the audit chain (audit-chain.ts): it gets the next `seq` and a `hash`
// over the previous event's hash and its own canonical JSON. NeDB compaction rewrites the file
// in _id order, so the chain follows seq, not lines. Pruning removes events in seq order only
// (the oldest first) and first records the anchor, the hash of the last event it removes, so
// the kept events still verify, even when a prune stops midway.

import { randomBytes } from 'node:crypto';
import type Datastore from '@seald-io/nedb';
import { ANCHOR_ID, canonicalJson, GENESIS_HASH, HASH_FIELD, linkHash } from './audit-chain';
import type { Logger } from './logger';
import { openDatastore } from './nedb-file';
import type { Role } from './protocol';

export type ConnectionEventKind = 'auth_ok' | 'reconnect' | 'disconnect' | 'ban' | 'unban' | 'auth_fail' | 'delete' | 'rotate_key';

export interface ConnectionEvent {
  identityId: string;
  role: Role | null;
  event: ConnectionEventKind;
  timestamp: number;
  online: boolean;
  reason?: string;
  /** Close code for disconnects. */
  code?: number;
  /** Peer address for auth attempts. */
  address?: string;
  /** For a boss's auth_ok or reconnect: the name of the credential it presented ("authkey" or a --boss-keys-file name). */
  credential?: string;
}

export interface RetentionPolicy {
  retentionMs: number;
  maxEvents: number;
}

type Doc = Record<string, unknown>;

const idPrefix = randomBytes(6).toString('hex');
let idCounter = 0;

export class ConnectionLog {
  private pending: Doc[] = [];
  private writing: Promise<void> = Promise.resolve();
  private scheduled = false;
  /** The chain: the last event's seq and hash, and the oldest seq still kept. */
  private lastSeq = 0;
  private lastHash = GENESIS_HASH;
  private firstSeq = 1;
  private hasAnchor = false;

  private constructor(
    private readonly db: Datastore<Doc>,
    private readonly logger: Logger,
  ) {
    let first = Infinity;
    for (const doc of db.getAllData()) {
      if (doc._id === ANCHOR_ID) {
        this.hasAnchor = true;
        if (typeof doc.anchor_seq === 'number' && doc.anchor_seq >= this.lastSeq && typeof doc.anchor === 'string') {
          this.lastSeq = doc.anchor_seq;
          this.lastHash = doc.anchor;
        }
        continue;
      }
      if (typeof doc.seq !== 'number' || typeof doc[HASH_FIELD] !== 'string') continue;
      first = Math.min(first, doc.seq);
      if (doc.seq > this.lastSeq) {
        this.lastSeq = doc.seq;
        this.lastHash = doc[HASH_FIELD];
      }
    }
    this.firstSeq = Number.isFinite(first) ? first : this.lastSeq + 1;
  }

  static async open(filename: string, logger: Logger, compactionIntervalMs: number, fileMode?: number): Promise<ConnectionLog> {
    const db = await openDatastore<Doc>(filename, logger, compactionIntervalMs, fileMode);
    await db.ensureIndexAsync({ fieldName: 'identityId' });
    await db.ensureIndexAsync({ fieldName: 'timestamp' });
    await db.ensureIndexAsync({ fieldName: 'seq', sparse: true });
    return new ConnectionLog(db, logger);
  }

  /** Events held (the chain's anchor document is not one). */
  get size(): number {
    return this.db.getAllData().length - (this.hasAnchor ? 1 : 0);
  }

  record(event: ConnectionEvent): void {
    const doc: Doc = { _id: idPrefix + (++idCounter).toString(36), seq: this.lastSeq + 1 };
    for (const [key, value] of Object.entries(event)) if (value !== undefined) doc[key] = value;
    const hash = linkHash(this.lastHash, canonicalJson(doc));
    doc[HASH_FIELD] = hash;
    this.lastSeq++;
    this.lastHash = hash;
    this.pending.push(doc);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  flush(): Promise<void> {
    this.writing = this.writing.then(async () => {
      if (this.pending.length === 0) return;
      const batch = this.pending;
      this.pending = [];
      try {
        await this.db.insertAsync(batch);
      } catch (error) {
        this.logger.error('connection_log_write_failed', { events: batch.length, error: (error as Error).message });
      }
    });
    return this.writing;
  }

  /** Drops events past the retention age or the count cap, oldest first (in seq order). */
  async prune(policy: RetentionPolicy, now = Date.now()): Promise<number> {
    await this.flush();
    let removed = 0;
    const cutoff = policy.retentionMs > 0 ? now - policy.retentionMs : -Infinity;
    // Events from before the audit trail have no seq: by age and count as always.
    if (policy.retentionMs > 0) removed += await this.db.removeAsync({ timestamp: { $lt: cutoff }, seq: { $exists: false } }, { multi: true });
    let excess = policy.maxEvents > 0 ? this.size - policy.maxEvents : 0;
    if (excess > 0) {
      const oldest = await this.db.findAsync({ seq: { $exists: false }, _id: { $ne: ANCHOR_ID } }, { _id: 1 }).sort({ timestamp: 1 }).limit(excess);
      const ids = oldest.map((doc) => doc._id);
      const dropped = ids.length > 0 ? await this.db.removeAsync({ _id: { $in: ids } }, { multi: true }) : 0;
      removed += dropped;
      excess -= dropped;
    }
    // Chained events: up to the newest one past the age, and the oldest `excess` beyond it.
    let lastDropped = Math.min(this.lastSeq, this.firstSeq - 1 + Math.max(0, excess));
    if (policy.retentionMs > 0) {
      for (const doc of await this.db.findAsync({ timestamp: { $lt: cutoff }, seq: { $exists: true } }, { seq: 1 })) {
        if (typeof doc.seq === 'number' && doc.seq > lastDropped) lastDropped = doc.seq;
      }
    }
    if (lastDropped >= this.firstSeq) {
      const last = await this.db.findOneAsync({ seq: lastDropped });
      if (last !== null && typeof last[HASH_FIELD] === 'string') {
        // The anchor first: a prune stopped after it leaves events the verifier passes over.
        await this.db.updateAsync({ _id: ANCHOR_ID }, { _id: ANCHOR_ID, anchor_seq: lastDropped, anchor: last[HASH_FIELD] }, { upsert: true });
        this.hasAnchor = true;
        removed += await this.db.removeAsync({ seq: { $lte: lastDropped } }, { multi: true });
        this.firstSeq = lastDropped + 1;
      }
    }
    if (removed > 0) await this.db.compactDatafileAsync();
    return removed;
  }

  async close(): Promise<void> {
    await this.flush();
    this.db.stopAutocompaction();
  }
}
