// Identity delete and key rotation in a cluster (docs/CLUSTER.md, "Identity delete and key
// rotation"): the record leaves Redis with its ban and its queued copies, and the control
// channel tells every node, so the node holding the session closes it (4010 / 4009) and every
// replica forgets the identity or takes the new key hash.
//
// A removed id is remembered for a while (a tombstone) on every node: a write of the identity
// that was already on its way when it was removed (the holder saving its last activity) must
// neither bring the record back in Redis nor into a replica through its announcement.

import type Redis from 'ioredis';
import type { SharedQueuedEntry } from './cluster-link';

/** How long a node ignores writes and announcements of an identity removed from the cluster. */
export const TOMBSTONE_MS = 10 * 60_000;

// Removes the identity and its ban, leaves its tombstone and announces the removal, only when
// this call removed it (two nodes pruning the same identity announce it once). With ARGV[5] "1"
// an identity online on any node is kept (pruning). Answers [removed 0|1, holder node or nil].
const REMOVE_SCRIPT = `
local holder = redis.call('HGET', KEYS[3], ARGV[1])
if holder and ARGV[5] == '1' then return {0, holder} end
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if removed == 1 then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return {removed, holder}`;


/** What the removal found: the node holding the identity's session (null when offline) and its dropped queued copies. */
export interface SharedRemoval {
  holder: string | null;
  dropped: SharedQueuedEntry[];
}

/** The full names of the keys and the channel the lifecycle touches (lib/redis-cluster.ts owns them). */
export interface LifecycleKeys {
  identities: string;
  /** Identities' merged liveness times (lib/redis-identities.ts). */
  seen: string;
  banned: string;
  presence: string;
  control: string;
  /** What a removed identity's tombstone key starts with. */
  removedPrefix: string;
}

/** An announcement on the control channel about an identity's lifecycle. */
export type LifecycleMessage =
  | { t: 'removed'; node: string; id: string; by: string }
  | { t: 'rotated'; node: string; id: string; by: string };

export class SharedLifecycle {
  /** id → until when writes and announcements of it are ignored on this node. */
  private readonly tombstones = new Map<string, number>();

  constructor(
    private readonly redis: Redis,
    private readonly keys: LifecycleKeys,
    private readonly nodeId: string,
    private readonly takeQueued: (id: string) => Promise<SharedQueuedEntry[]>,
  ) {}

  /** The Redis key marking a removed identity (checked by IDENTITY_WRITE_SCRIPT). */
  tombstoneKey(id: string): string {
    return this.keys.removedPrefix + id;
  }

  /**
   * Removes the identity from the shared store and announces it; then takes its queued copies
   * out (the caller reports them expired). Null when another node removed it first, or, with
   * `onlyOffline`, when it is online on some node.
   */
  async remove(id: string, by: string, onlyOffline: boolean): Promise<SharedRemoval | null> {
    const announcement: LifecycleMessage = { t: 'removed', node: this.nodeId, id, by };
    const answer = (await this.redis.eval(
      REMOVE_SCRIPT,
      5,
      this.keys.identities,
      this.keys.banned,
      this.keys.presence,
      this.tombstoneKey(id),
      this.keys.seen,
      id,
      this.keys.control,
      JSON.stringify(announcement),
      TOMBSTONE_MS,
      onlyOffline ? '1' : '0',
    )) as [number, string | null];
    if (answer[0] !== 1) return null;
    this.bury(id);
    const dropped = await this.takeQueued(id);
    return { holder: typeof answer[1] === 'string' ? answer[1] : null, dropped };
  }

  /** Announces a rotated key (its new hash is in Redis already); the node holding the session, if any. */
  async rotated(id: string, by: string): Promise<string | null> {
    const announcement: LifecycleMessage = { t: 'rotated', node: this.nodeId, id, by };
    const results = await this.redis.multi().hget(this.keys.presence, id).publish(this.keys.control, JSON.stringify(announcement)).exec();
    const holder = results?.[0]?.[1];
    return typeof holder === 'string' ? holder : null;
  }

  /** Remembers a removed id on this node. */
  bury(id: string): void {
    this.tombstones.set(id, Date.now() + TOMBSTONE_MS);
  }

  isBuried(id: string): boolean {
    const until = this.tombstones.get(id);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.tombstones.delete(id);
    return false;
  }

  /** Forgets tombstones past their time (called every heartbeat). */
  sweep(now = Date.now()): void {
    for (const [id, until] of this.tombstones) if (until <= now) this.tombstones.delete(id);
  }
}
