// Moving a single node's data dir into a cluster: its identities (key hashes as they are, bans)
// and its store-and-forward queues are written into Redis in the cluster's own formats
// (lib/redis-cluster.ts, lib/redis-queue.ts), so every employee keeps its id and key and gets its
// queued messages, in order, from whichever node it reaches. The data dir is locked meanwhile, so
// no relay can run on it while it is read; its files are left as they were.

import fs from 'node:fs/promises';
import path from 'node:path';
import type Redis from 'ioredis';
import type { QueuedOutcome } from './cluster-link';
import { DataDirLockedError, lockDataDir, type DataDirLock } from './data-dir-lock';
import { DeliveryQueue, type NewQueuedEntry } from './delivery-queue';
import { IdentityStore } from './identity-store';
import { createLogger } from './logger';
import { loadNodeId } from './node-id';
import { DEFAULTS } from './options';
import { BANNED_KEY, clusterPrefix, IDENTITIES_KEY, identityRecord } from './redis-cluster';
import { connectRedis } from './redis-connection';
import { SharedQueue } from './redis-queue';

/** A migration that cannot run as asked; the message says why and what to do. */
export class MigrateError extends Error {}

export interface MigrateOptions {
  redisUrl: string;
  clusterName: string;
  dataDir: string;
  /** Overwrite identities the cluster already has (else the migration is refused). */
  force: boolean;
}

export interface MigrateResult {
  identities: number;
  banned: number;
  /** Identities that were already in the cluster and were overwritten (--force). */
  overwritten: number;
  queued: number;
  targets: number;
  /** Copies whose TTL had passed: not carried. */
  expired: number;
  /** Copies the cluster already had from an earlier migration: not written twice. */
  alreadyThere: number;
}

/** Long enough that no compaction runs while the files are read. */
const NO_COMPACTION_MS = 86_400_000;
/** Identities written per Redis round trip. */
const BATCH = 500;

export async function migrateDataDir(options: MigrateOptions): Promise<MigrateResult> {
  const identitiesFile = path.join(options.dataDir, 'identities.db');
  const stat = await fs.stat(identitiesFile).catch(() => null);
  // The files keep the mode the relay gave them (--file-mode).
  const fileMode = stat === null ? 0o600 : stat.mode & 0o777;
  if (stat === null || !stat.isFile()) throw new MigrateError(`No identities.db in ${options.dataDir}: give the single relay's --data-dir.`);
  let lock: DataDirLock;
  try {
    lock = await lockDataDir(options.dataDir, fileMode);
  } catch (error) {
    if (!(error instanceof DataDirLockedError)) throw error;
    throw new MigrateError(error.message.replace(', or give this one its own --data-dir.', ' first, then run migrate again.'));
  }
  let redis: Redis | null = null;
  try {
    // Reached before the files are opened: an unreachable Redis changes nothing in the data dir.
    redis = await connectRedis(options.redisUrl, 'mimiclaw:migrate');
    return await migrate(redis, options, fileMode);
  } finally {
    if (redis !== null) await redis.quit().catch(() => redis?.disconnect());
    await lock.release();
  }
}

async function migrate(redis: Redis, options: MigrateOptions, fileMode: number): Promise<MigrateResult> {
  const logger = createLogger('warn');
  const file = (name: string) => path.join(options.dataDir, name);
  const identities = await IdentityStore.open(file('identities.db'), logger, NO_COMPACTION_MS, fileMode);
  const queue = await DeliveryQueue.open(file('queue.db'), logger, { compactionIntervalMs: NO_COMPACTION_MS, fsync: false, fileMode });
  try {
    const prefix = clusterPrefix(options.clusterName);
    const all = [...identities.all()];
    const result: MigrateResult = { identities: 0, banned: 0, overwritten: 0, queued: 0, targets: 0, expired: 0, alreadyThere: 0 };

    const present: string[] = [];
    for (let i = 0; i < all.length; i += BATCH) {
      const ids = all.slice(i, i + BATCH).map((identity) => identity.id);
      const found = await redis.hmget(prefix + IDENTITIES_KEY, ...ids);
      ids.forEach((id, index) => {
        if (found[index] !== null) present.push(id);
      });
    }
    if (present.length > 0 && !options.force) {
      throw new MigrateError(
        `Cluster "${options.clusterName}" already has ${present.length} of these ${all.length} identities (e.g. ${present[0]!}): nothing was written. ` +
          'Run again with --force to overwrite them with the data dir\'s (queued messages already carried are not written twice).',
      );
    }

    for (let i = 0; i < all.length; i += BATCH) {
      const multi = redis.multi();
      for (const identity of all.slice(i, i + BATCH)) {
        multi.hset(prefix + IDENTITIES_KEY, identity.id, JSON.stringify(identityRecord(identity)));
        if (identity.banned) multi.sadd(prefix + BANNED_KEY, identity.id);
        else multi.srem(prefix + BANNED_KEY, identity.id);
      }
      await execAll(multi);
    }
    result.identities = all.length;
    result.banned = all.filter((identity) => identity.banned).length;
    result.overwritten = present.length;

    // The copies keep the data dir's node id as their origin: a node later started on this data
    // dir finds their messages.db records and marks them delivered or expired.
    const origin = await loadNodeId(options.dataDir, undefined, fileMode);
    let dropped = 0;
    const shared = new SharedQueue(redis, prefix, origin, DEFAULTS.maxQueuedPerTarget, logger, (outcome: QueuedOutcome) => {
      if (outcome.status === 'expired') dropped++;
    });
    const now = Date.now();
    for (const identity of all) {
      const pending = queue.pendingFor(identity.id);
      if (pending.length === 0) continue;
      const there = await shared.recordIds(identity.id);
      const entries: NewQueuedEntry[] = [];
      for (const { _id: _unused, seq: _seq, ...entry } of pending) {
        if (entry.expires_at <= now) result.expired++;
        else if (there.has(entry.record_id)) result.alreadyThere++;
        else entries.push(entry);
      }
      if (entries.length === 0) continue;
      await shared.enqueue(entries);
      result.queued += entries.length;
      result.targets++;
    }
    result.queued -= dropped;
    result.expired += dropped;
    return result;
  } finally {
    await Promise.all([identities.close(), queue.close()]);
  }
}

async function execAll(multi: ReturnType<Redis['multi']>): Promise<void> {
  const results = await multi.exec();
  const failed = results?.find(([error]) => error !== null);
  if (!results || failed) throw failed?.[0] ?? new Error('the Redis transaction was not run');
}

export function describeResult(result: MigrateResult, options: MigrateOptions, printableRedis: string): string {
  const parts = [
    `${result.identities} identities (${result.banned} banned${result.overwritten > 0 ? `, ${result.overwritten} overwritten` : ''})`,
    `${result.queued} queued messages for ${result.targets} target${result.targets === 1 ? '' : 's'}`,
  ];
  if (result.expired > 0) parts.push(`${result.expired} expired queued messages left out`);
  if (result.alreadyThere > 0) parts.push(`${result.alreadyThere} queued messages already in the cluster`);
  return `migrated ${options.dataDir} into cluster "${options.clusterName}" at ${printableRedis}: ${parts.join(', ')}`;
}
