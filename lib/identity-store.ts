// Every boss and employee identity. Identities live in memory (the router needs them on every
// message) and are written back coalesced: a change marks the identity dirty and one flush per
// tick writes each dirty identity once, so routing never rewrites identities. Where they are
// written is an IdentityPersistence: identities.db on a single node, Redis in a cluster (where
// this store is the node's replica, and changes made on other nodes arrive through apply()).
// Keys are stored only as SHA-256 hashes; data dirs with clear keys are migrated at open.
// An ephemeral identity lives in memory only: it is never written, so no restart brings it back.

import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { livenessOf, raiseLiveness } from './identity-liveness';
import type { Logger } from './logger';
import { openDatastore } from './nedb-file';
import type { EmployeeProfile, Role } from './protocol';

export interface Identity {
  id: string;
  role: Role;
  keyHash: string;
  banned: boolean;
  name: string | null;
  tags: string[];
  meta: Record<string, unknown> | null;
  createdAt: number;
  lastSeen: number;
  lastConnectedAt: number | null;
  lastDisconnectedAt: number | null;
  lastHeartbeatAt: number | null;
  lastSelfReportAt: number | null;
  selfReportValid: boolean | null;
  /** The name of the boss credential (--authkey or a --boss-keys-file entry) of the last boss auth. */
  credential: string | null;
  /** Forgotten when its connection ends; kept in memory only. */
  ephemeral: boolean;
}

/** Where identities are written: one document per identity, keyed by id. */
export interface IdentityPersistence {
  write(doc: IdentityDoc): Promise<void>;
  /** Deletes the identity's document (an admin's delete, --forget-offline-after). */
  remove(id: string): Promise<void>;
  close(): Promise<void>;
}

/** On disk; meta is kept as JSON text because NeDB refuses field names with "." or "$". */
export type IdentityDoc = Omit<Identity, 'meta' | 'ephemeral'> & { _id: string; meta_json: string | null; key?: string };

function newKey(): string {
  return randomBytes(24).toString('hex');
}

export function hashKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

export function toDoc(identity: Identity): IdentityDoc {
  const { meta, ephemeral: _ephemeral, ...rest } = identity;
  return { _id: identity.id, ...rest, meta_json: meta === null ? null : JSON.stringify(meta) };
}

/** Stored meta; unreadable meta is dropped rather than stopping the start. */
function parseMeta(json: string): Record<string, unknown> | null {
  try {
    const value: unknown = JSON.parse(json);
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

export function fromDoc(doc: Record<string, unknown>): Identity | null {
  const id = typeof doc.id === 'string' ? doc.id : typeof doc._id === 'string' ? doc._id : null;
  const role = doc.role === 'boss' || doc.role === 'employee' ? doc.role : null;
  const keyHash =
    typeof doc.keyHash === 'string' ? doc.keyHash : typeof doc.key === 'string' ? hashKey(doc.key) : null;
  if (id === null || role === null || keyHash === null) return null;
  const num = (value: unknown) => (typeof value === 'number' && Number.isFinite(value) ? value : null);
  let meta: Record<string, unknown> | null = null;
  if (typeof doc.meta_json === 'string') meta = parseMeta(doc.meta_json);
  else if (typeof doc.meta === 'object' && doc.meta !== null) meta = doc.meta as Record<string, unknown>;
  const now = Date.now();
  return {
    id,
    role,
    keyHash,
    banned: doc.banned === true,
    name: typeof doc.name === 'string' ? doc.name : null,
    tags: Array.isArray(doc.tags) ? doc.tags.filter((t): t is string => typeof t === 'string') : [],
    meta,
    createdAt: num(doc.createdAt) ?? now,
    lastSeen: num(doc.lastSeen) ?? now,
    lastConnectedAt: num(doc.lastConnectedAt),
    lastDisconnectedAt: num(doc.lastDisconnectedAt),
    lastHeartbeatAt: num(doc.lastHeartbeatAt),
    lastSelfReportAt: num(doc.lastSelfReportAt),
    selfReportValid: typeof doc.selfReportValid === 'boolean' ? doc.selfReportValid : null,
    credential: typeof doc.credential === 'string' ? doc.credential : null,
    ephemeral: false,
  };
}

export class IdentityStore {
  private readonly byId = new Map<string, Identity>();
  private readonly employeesByTag = new Map<string, Set<string>>();
  private readonly dirty = new Set<string>();
  private flushing: Promise<void> = Promise.resolve();
  private flushScheduled = false;

  private constructor(
    private readonly persistence: IdentityPersistence,
    private readonly logger: Logger,
  ) {}

  /** A store over documents already loaded from elsewhere (Redis), written back through `persistence`. */
  static fromDocs(docs: Iterable<Record<string, unknown>>, persistence: IdentityPersistence, logger: Logger): IdentityStore {
    const store = new IdentityStore(persistence, logger);
    for (const doc of docs) {
      const identity = fromDoc(doc);
      if (identity) store.index(identity);
      else logger.warn('identity_skipped', { reason: 'unreadable document', id: typeof doc._id === 'string' ? doc._id : null });
    }
    return store;
  }

  static async open(filename: string, logger: Logger, compactionIntervalMs: number, fileMode?: number): Promise<IdentityStore> {
    const db = await openDatastore<Record<string, unknown>>(filename, logger, compactionIntervalMs, fileMode);
    const persistence: IdentityPersistence = {
      write: async (doc) => {
        await db.updateAsync({ _id: doc._id }, doc, { upsert: true });
      },
      remove: async (id) => {
        await db.removeAsync({ _id: id }, {});
      },
      close: async () => db.stopAutocompaction(),
    };
    const store = new IdentityStore(persistence, logger);
    let migrated = 0;
    for (const doc of db.getAllData()) {
      const identity = fromDoc(doc);
      if (identity === null) {
        logger.warn('identity_skipped', { reason: 'unreadable document', id: typeof doc._id === 'string' ? doc._id : null });
        continue;
      }
      store.index(identity);
      if (typeof doc.key === 'string' || typeof doc.meta === 'object') {
        store.dirty.add(identity.id);
        migrated++;
      }
    }
    if (migrated > 0) {
      // Clear keys are replaced by their hashes in place, then compaction drops the old lines.
      await store.flush();
      await db.compactDatafileAsync();
      logger.info('identities_migrated', { count: migrated });
    }
    return store;
  }

  get size(): number {
    return this.byId.size;
  }

  /**
   * Takes in an identity as another node wrote it (cluster replica), keeping the tag index
   * right; the in-memory object stays the same one, so sessions holding it see the change.
   */
  apply(doc: Record<string, unknown>): Identity | null {
    const incoming = fromDoc(doc);
    if (incoming === null) return null;
    const known = this.byId.get(incoming.id);
    if (!known) {
      this.index(incoming);
      return incoming;
    }
    this.unindexTags(known);
    // Liveness only moves forward: a document written earlier elsewhere does not take its times back.
    const seen = livenessOf(known);
    Object.assign(known, incoming);
    raiseLiveness(known, seen);
    this.indexTags(known);
    return known;
  }

  get(id: string): Identity | undefined {
    return this.byId.get(id);
  }

  all(): IterableIterator<Identity> {
    return this.byId.values();
  }

  /** Employee ids carrying `tag`. */
  withTag(tag: string): ReadonlySet<string> {
    return this.employeesByTag.get(tag) ?? new Set();
  }

  create(role: Role, profile: EmployeeProfile | null, meta: Record<string, unknown> | null, ephemeral = false): { identity: Identity; key: string } {
    const key = newKey();
    const now = Date.now();
    const identity: Identity = {
      id: `${role}-${randomUUID()}`,
      role,
      keyHash: hashKey(key),
      banned: false,
      name: profile?.name ?? null,
      tags: profile?.tags ?? [],
      meta,
      createdAt: now,
      lastSeen: now,
      lastConnectedAt: null,
      lastDisconnectedAt: null,
      lastHeartbeatAt: null,
      lastSelfReportAt: null,
      selfReportValid: null,
      credential: null,
      ephemeral,
    };
    this.index(identity);
    this.save(identity);
    return { identity, key };
  }

  keyMatches(identity: Identity, key: string): boolean {
    const given = Buffer.from(hashKey(key), 'hex');
    const stored = Buffer.from(identity.keyHash, 'hex');
    return given.length === stored.length && timingSafeEqual(given, stored);
  }

  /** Replaces an employee's name and tags, keeping the tag index right. */
  setProfile(identity: Identity, profile: EmployeeProfile): void {
    this.unindexTags(identity);
    identity.name = profile.name;
    identity.tags = profile.tags;
    this.indexTags(identity);
    this.save(identity);
  }

  /** Gives the identity a new key and returns it; the old key stops matching at once. */
  rotateKey(identity: Identity): string {
    const key = newKey();
    identity.keyHash = hashKey(key);
    this.save(identity);
    return key;
  }

  /**
   * Forgets the identity: gone from memory now, from identities.db once the returned promise
   * resolves. The removal queues behind any write of it already under way, so a write in flight
   * cannot bring the document back.
   */
  remove(identity: Identity): Promise<void> {
    if (this.byId.get(identity.id) !== identity) return this.flushing;
    this.byId.delete(identity.id);
    this.unindexTags(identity);
    this.dirty.delete(identity.id);
    if (identity.ephemeral) return this.flushing;
    this.flushing = this.flushing.then(async () => {
      try {
        await this.persistence.remove(identity.id);
      } catch (error) {
        this.logger.error('identity_remove_failed', { id: identity.id, error: (error as Error).message });
      }
    });
    return this.flushing;
  }

  /** Identities not seen since `cutoff` (ms) for which `isOnline` says no. */
  offlineSince(cutoff: number, isOnline: (id: string) => boolean): Identity[] {
    const stale: Identity[] = [];
    for (const identity of this.byId.values()) {
      if (identity.lastSeen < cutoff && !isOnline(identity.id)) stale.push(identity);
    }
    return stale;
  }

  /** Marks the identity for the next coalesced write (an ephemeral one is never written). */
  save(identity: Identity): void {
    if (identity.ephemeral) return;
    this.dirty.add(identity.id);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      void this.flush();
    });
  }

  /** Writes every dirty identity; resolves when they are on disk. */
  flush(): Promise<void> {
    this.flushing = this.flushing.then(() => this.writeDirty());
    return this.flushing;
  }

  private async writeDirty(): Promise<void> {
    const ids = [...this.dirty];
    this.dirty.clear();
    for (const id of ids) {
      const identity = this.byId.get(id);
      if (!identity) continue;
      try {
        await this.persistence.write(toDoc(identity));
      } catch (error) {
        this.logger.error('identity_write_failed', { id, error: (error as Error).message });
        this.dirty.add(id);
      }
    }
  }

  async close(): Promise<void> {
    await this.flush();
    await this.persistence.close();
  }

  private index(identity: Identity): void {
    this.byId.set(identity.id, identity);
    this.indexTags(identity);
  }

  private indexTags(identity: Identity): void {
    if (identity.role !== 'employee') return;
    for (const tag of identity.tags) {
      let ids = this.employeesByTag.get(tag);
      if (!ids) this.employeesByTag.set(tag, (ids = new Set()));
      ids.add(identity.id);
    }
  }

  private unindexTags(identity: Identity): void {
    for (const tag of identity.tags) {
      const ids = this.employeesByTag.get(tag);
      ids?.delete(identity.id);
      if (ids && ids.size === 0) this.employeesByTag.delete(tag);
    }
  }
}
