// connections.db: auth, reconnect, disconnect, ban, unban, auth_fail, delete and rotate_key events. Events are
// buffered and inserted once per tick in one NeDB append; retention keeps the file bounded.

import type Datastore from '@seald-io/nedb';
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

export class ConnectionLog {
  private pending: ConnectionEvent[] = [];
  private writing: Promise<void> = Promise.resolve();
  private scheduled = false;

  private constructor(
    private readonly db: Datastore<Record<string, unknown>>,
    private readonly logger: Logger,
  ) {}

  static async open(filename: string, logger: Logger, compactionIntervalMs: number, fileMode?: number): Promise<ConnectionLog> {
    const db = await openDatastore<Record<string, unknown>>(filename, logger, compactionIntervalMs, fileMode);
    await db.ensureIndexAsync({ fieldName: 'identityId' });
    await db.ensureIndexAsync({ fieldName: 'timestamp' });
    return new ConnectionLog(db, logger);
  }

  get size(): number {
    return this.db.getAllData().length;
  }

  record(event: ConnectionEvent): void {
    this.pending.push(event);
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
        await this.db.insertAsync(batch.map((event) => ({ ...event })));
      } catch (error) {
        this.logger.error('connection_log_write_failed', { events: batch.length, error: (error as Error).message });
      }
    });
    return this.writing;
  }

  /** Drops events past the retention age or the count cap, oldest first. */
  async prune(policy: RetentionPolicy, now = Date.now()): Promise<number> {
    let removed = 0;
    if (policy.retentionMs > 0) {
      removed += await this.db.removeAsync({ timestamp: { $lt: now - policy.retentionMs } }, { multi: true });
    }
    const excess = policy.maxEvents > 0 ? this.size - policy.maxEvents : 0;
    if (excess > 0) {
      const oldest = await this.db.findAsync({}, { _id: 1 }).sort({ timestamp: 1 }).limit(excess);
      const ids = oldest.map((doc) => doc._id);
      removed += await this.db.removeAsync({ _id: { $in: ids } }, { multi: true });
    }
    if (removed > 0) await this.db.compactDatafileAsync();
    return removed;
  }

  async close(): Promise<void> {
    await this.flush();
    this.db.stopAutocompaction();
  }
}
