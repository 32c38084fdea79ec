// Identities in the cluster store (docs/CLUSTER.md, "Identities: revisions and liveness"). Two
// kinds of write, so a write that reaches Redis (or another node) late never takes an identity
// back in time:
// - a change of its document (name, tags, meta, key, credential, ...) is stored whole with a
//   revision Redis numbers atomically (IDENTITY_WRITE_SCRIPT); a replica takes in an announced
//   document only when its revision is newer than the one it holds;
// - a write that changes only liveness (connect, disconnect, heartbeat times) carries only those
//   times, merged into hash `identity-seen` by taking the later one (IDENTITY_SEEN_SCRIPT).
// Which kind a write is follows from what changed: the replica remembers, per identity, the
// revision and document it holds, and a document equal to it is a liveness-only write.

import { createHash } from 'node:crypto';
import type Redis from 'ioredis';
import { LIVENESS_FIELDS, livenessOf, raiseLiveness, readLiveness } from './identity-liveness';
import { fromDoc, toDoc, type Identity, type IdentityDoc } from './identity-store';
import { parseObject } from './protocol';
import { IDENTITY_SEEN_SCRIPT, IDENTITY_WRITE_SCRIPT } from './redis-scripts';

/** Hash id → the identity's liveness times as merged from every node's writes. */
export const IDENTITY_SEEN_KEY = 'identity-seen';
/** The last revision handed out to an identity document (one counter for all identities). */
export const IDENTITY_REVISION_KEY = 'identity-revision';

/** The full names of the keys and the channel identities use. */
export interface IdentityKeys {
  identities: string;
  seen: string;
  revision: string;
  banned: string;
  control: string;
  /** What a removed identity's tombstone key starts with (lib/redis-lifecycle.ts): a write of it is refused. */
  removedPrefix: string;
}

/** What this node's replica holds of an identity's document: the store's revision and a digest of the document. */
interface Held {
  revision: number;
  document: string;
}

/** A stored or announced document's revision; a document without one (written by `migrate`) is revision 0. */
export function revisionOf(doc: Record<string, unknown>): number {
  const revision = doc.revision;
  return typeof revision === 'number' && Number.isSafeInteger(revision) && revision > 0 ? revision : 0;
}

/** A digest of the identity without its liveness and ban: what only a document change moves. */
function documentText(doc: IdentityDoc): string {
  const rest: Record<string, unknown> = {};
  for (const [field, value] of Object.entries(doc)) if (field !== 'banned' && !LIVENESS_FIELDS.includes(field)) rest[field] = value;
  return createHash('sha256').update(JSON.stringify(rest)).digest('base64');
}

/** An identity as hash `identities` holds it: the document without the ban (kept in set `banned`). */
export function identityRecord(identity: IdentityDoc | Identity): Omit<IdentityDoc, 'banned'> {
  const { banned: _banned, ...record } = '_id' in identity ? identity : toDoc(identity);
  return record;
}

export class SharedIdentities {
  private readonly held = new Map<string, Held>();

  constructor(
    private readonly redis: Redis,
    private readonly keys: IdentityKeys,
    private readonly nodeId: string,
  ) {}

  /** Every identity in the store, its times raised to the merged liveness, with its ban; each is noted as held. */
  async readAll(): Promise<IdentityDoc[]> {
    const { identities, seen, banned } = this.keys;
    const [entries, times, bannedIds] = await Promise.all([this.redis.hgetall(identities), this.redis.hgetall(seen), this.redis.smembers(banned)]);
    const isBanned = new Set(bannedIds);
    const docs: IdentityDoc[] = [];
    for (const [id, json] of Object.entries(entries)) {
      const doc = this.take(id, json, times[id] ?? null, isBanned.has(id), true);
      if (doc) docs.push(doc);
    }
    return docs;
  }

  /** One identity from the store (undefined when it has none); noted as held unless the replica holds it already. */
  async read(id: string): Promise<Identity | undefined> {
    const [json, times, banned] = await Promise.all([this.redis.hget(this.keys.identities, id), this.redis.hget(this.keys.seen, id), this.redis.sismember(this.keys.banned, id)]);
    const doc = json === null ? null : this.take(id, json, times, banned === 1, !this.held.has(id));
    return doc === null ? undefined : (fromDoc(doc) ?? undefined);
  }

  private take(id: string, json: string, times: string | null, banned: boolean, note: boolean): IdentityDoc | null {
    const stored = parseObject(json);
    const identity = stored === null ? null : fromDoc({ ...stored, _id: id, id, banned });
    if (stored === null || identity === null) return null;
    const seen = times === null ? null : parseObject(times);
    if (seen !== null) raiseLiveness(identity, readLiveness(seen));
    const doc = toDoc(identity);
    if (note) this.held.set(id, { revision: revisionOf(stored), document: documentText(doc) });
    return doc;
  }

  /**
   * Another node's announced document: true when it is newer than the one this replica holds
   * (it is then noted as held and should be applied), false for a late, older one.
   */
  accept(doc: Record<string, unknown>): boolean {
    const identity = fromDoc(doc);
    if (identity === null) return false;
    const revision = revisionOf(doc);
    const held = this.held.get(identity.id);
    if (held !== undefined && revision <= held.revision) return false;
    this.held.set(identity.id, { revision, document: documentText(toDoc(identity)) });
    return true;
  }

  /**
   * Writes the identity as this node's replica has it: its document when that changed, else
   * only its liveness. Returns the written document when the replica must take it back in: an
   * older change from another node was applied while this write was on its way.
   */
  async write(doc: IdentityDoc): Promise<Record<string, unknown> | null> {
    const document = documentText(doc);
    const before = this.held.get(doc._id);
    const { identities, seen, control } = this.keys;
    if (before !== undefined && before.document === document) {
      await this.redis.eval(IDENTITY_SEEN_SCRIPT, 3, identities, seen, control, doc._id, JSON.stringify(livenessOf(doc)), JSON.stringify(this.nodeId));
      return null;
    }
    const record = identityRecord(doc);
    const tombstone = this.keys.removedPrefix + doc._id;
    const revision = Number(await this.redis.eval(IDENTITY_WRITE_SCRIPT, 4, identities, this.keys.revision, control, tombstone, doc._id, JSON.stringify(record), JSON.stringify(this.nodeId)));
    // 0: the identity was removed while this write was on its way; nothing was written.
    if (revision === 0) return null;
    const now = this.held.get(doc._id);
    // A newer change from another node is already here: the replica shows it, as does the store.
    if (now !== undefined && now.revision > revision) return null;
    this.held.set(doc._id, { revision, document });
    const overtaken = now !== undefined && now.revision > (before?.revision ?? 0);
    return overtaken ? { revision, ...record } : null;
  }

  /** Another node removed the identity: the replica no longer holds a revision of it. */
  forget(id: string): void {
    this.held.delete(id);
  }

  /** Deletes the identity from the store (its document and its times) and forgets what the replica held. */
  async remove(id: string): Promise<void> {
    this.held.delete(id);
    await this.redis.multi().hdel(this.keys.identities, id).hdel(this.keys.seen, id).exec();
  }
}
