// The ClusterLink of a node started with --redis: what lives in Redis and how nodes reach each
// other through it (docs/CLUSTER.md is the design; the key and channel names are listed there).
// Two connections: one for commands, one subscribed to this node's inbox and reply channels and
// the cluster's control channel.

import { randomUUID } from 'node:crypto';
import type Redis from 'ioredis';
import type {
  ClusterHandlers,
  ClusterLink,
  DedupeClaim,
  FramePieces,
  QueuedOutcome,
  RemoteOutcome,
  SharedQueuedEntry,
} from './cluster-link';
import type { NewQueuedEntry } from './delivery-queue';
import type { RelayEvent } from './events';
import { raiseLiveness, readLiveness } from './identity-liveness';
import { IdentityStore, type Identity, type IdentityDoc } from './identity-store';
import type { Logger } from './logger';
import { PresenceOrder } from './presence-order';
import { isPlainObject, parseObject } from './protocol';
import { RedisBatch, splitItems } from './redis-batch';
import { decodeInbox, encodeInboxRequest } from './redis-inbox';
import { closeRedis, ClusterStartError, connectRedis } from './redis-connection';
import { SharedDedupe } from './redis-dedupe';
import { IDENTITY_REVISION_KEY, IDENTITY_SEEN_KEY, SharedIdentities } from './redis-identities';
import { SharedLifecycle, type LifecycleMessage, type SharedRemoval } from './redis-lifecycle';
import { SharedQueue } from './redis-queue';
import { SharedThrottle, type ThrottledMessage } from './redis-throttle';
import { BURY_SCRIPT, HEARTBEAT_SCRIPT, JOIN_SCRIPT, LEAVE_SCRIPT, RELEASE_SCRIPT } from './redis-scripts';

/** A node's liveness key lives this long unless refreshed. */
export const NODE_TTL_MS = 5000;
/** How often a node refreshes its key and looks for dead nodes. */
export const HEARTBEAT_MS = 1000;
/**
 * How long every node stays subscribed to the shared events after it last heard that some node
 * has an /api/events reader: a stream that drops and comes back through the balancer on another
 * node within it resumes exactly, since that node's ring holds the whole cluster's events.
 */
export const EVENTS_LINGER_MS = 60_000;
/** How long a node arriving reader waits for every node to subscribe to the shared events. */
const EVENTS_SUBSCRIBED_WAIT_MS = 2000;
/** How long a node waits for another node's answer before counting its targets as not delivered. */
export const REPLY_TIMEOUT_MS = 3000;
/** How often a node tells the others when its identities were last active (well inside the 60 s heartbeat staleness). */
export const SEEN_SHARE_MS = 10_000;

/** What every key and channel of cluster `clusterName` starts with. */
export function clusterPrefix(clusterName: string): string {
  return `${clusterName}:`;
}

/** Hash id → identity record, and the set of banned ids (kept apart: see writeIdentity). */
export const IDENTITIES_KEY = 'identities';
export const BANNED_KEY = 'banned';

export { identityRecord } from './redis-identities';

export interface RedisClusterOptions {
  url: string;
  clusterName: string;
  nodeId: string;
  dedupeWindowMs: number;
  /** Most queued copies kept for one target; the oldest past it expire. */
  maxQueuedPerTarget: number;
  /** How often identities' last activity is shared (SEEN_SHARE_MS, or less to stay well inside a shorter heartbeat staleness). */
  seenShareMs?: number;
  logger: Logger;
}

type ControlMessage =
  | { t: 'replace'; node: string; id: string; token?: number }
  | { t: 'left'; node: string; id: string; token?: number }
  | { t: 'buried'; node: string }
  | { t: 'node_up'; node: string }
  | { t: 'events_on'; node: string }
  | { t: 'seen'; node: string; seen: unknown }
  | { t: 'identity'; node: string; doc: Record<string, unknown> }
  | { t: 'identity_seen'; node: string; id: string; seen: unknown }
  | { t: 'ban'; node: string; id: string; banned: boolean; by: string }
  | { t: 'queued'; ids: string[] }
  | ({ t: 'queued_outcome' } & QueuedOutcome)
  | LifecycleMessage
  | ThrottledMessage;

/** A request's JSON part; a deliver or broadcast carries the frame pieces after it (lib/redis-inbox.ts). */
type InboxMessage =
  | { t: 'deliver'; req: string; reply: string; ids: string[]; queueable?: boolean }
  | { t: 'broadcast'; req: string; reply: string; sender: string }
  | { t: 'query'; req: string; reply: string; kind: string; query: unknown };

/** Answers reads that span the cluster (e.g. /admin/communications) from this node's own data. */
export type QueryHandler = (kind: string, query: unknown) => Promise<unknown>;

interface ReplyMessage {
  req: string;
  outcomes?: Record<string, RemoteOutcome>;
  reached?: string[];
  result?: unknown;
}

interface PendingRequest {
  /** performance.now() after which the request counts as unanswered. */
  deadline: number;
  answer(reply: ReplyMessage | null): void;
}

export class NodeIdTakenError extends ClusterStartError {}

/** Where the other nodes' events go (this node's /api/events ring, lib/event-stream.ts). */
export interface SharedEventsSink {
  receiveShared(origin: string, seq: number, event: RelayEvent): void;
  /** The node stops listening: it cannot vouch for what other nodes do meanwhile. */
  stopHearing(): void;
}

export class RedisCluster implements ClusterLink {
  readonly clustered = true;
  /** The node's replica of every identity, written through to Redis. */
  readonly identities: IdentityStore;
  private handlers: ClusterHandlers | null = null;
  private readonly token = randomUUID();
  private readonly prefix: string;
  /** This node's inbox and reply channels (compared on every message that arrives). */
  private readonly inboxChannel: string;
  private readonly replyChannel: string;
  /** Requests waiting for their answer, in the order they were sent (so oldest deadline first). */
  private readonly pending = new Map<string, PendingRequest>();
  /** The one timer that ends the oldest pending request when its answer is late. */
  private replyTimer: NodeJS.Timeout | null = null;
  private readonly queue: SharedQueue;
  private readonly dedupe: SharedDedupe;
  /** Inbox requests, replies and dedupe commands of one event-loop turn, sent as one script call. */
  private readonly batch: RedisBatch;
  private readonly lifecycle: SharedLifecycle;
  /** Wrong auth secrets counted across the nodes (lib/redis-throttle.ts). */
  readonly authFailures: SharedThrottle;
  private requestSeq = 0;
  /** Mirror of the shared presence (id → node), kept by the control channel; admin reads use it. */
  private readonly presence = new Map<string, string>();
  /** Join tokens: which of an identity's sessions is the newest (lib/presence-order.ts). */
  private readonly order = new PresenceOrder();
  /** Other nodes alive at the last check. */
  private liveNodes: string[] = [];
  private heartbeat: NodeJS.Timeout | null = null;
  /** Where other nodes' events go (this node's /api/events), and whether anyone reads it now. */
  private eventSink: SharedEventsSink | null = null;
  private queryHandler: QueryHandler | null = null;
  private eventsWanted: () => boolean = () => false;
  private eventsSubscribed = false;
  /** No node listened at the last publish: events are not published again before this time. */
  private eventsMutedUntil = 0;
  /** How many `events_on` announcements this node has heard (a reader subscribed somewhere). */
  private eventsReadersAnnounced = 0;
  /** The last publish reached a reader (or one was announced since): every event is published. */
  private eventsHeard = true;
  /** A publish is out to learn whether anyone listens again: no more until it is answered. */
  private eventsProbing = false;
  /** Some node had an /api/events reader within EVENTS_LINGER_MS before this time: stay subscribed. */
  private eventsLingerUntil = 0;
  private closed = false;
  private ticking = false;
  private seenSharedAt = 0;
  /** Shares identities' last activity, on its own cadence (a heartbeat staleness can be shorter than the heartbeat). */
  private seenTimer: NodeJS.Timeout | null = null;

  private constructor(
    private readonly options: RedisClusterOptions,
    private readonly redis: Redis,
    private readonly sub: Redis,
    private readonly sharedIdentities: SharedIdentities,
    docs: IdentityDoc[],
  ) {
    this.prefix = clusterPrefix(options.clusterName);
    this.inboxChannel = `${this.prefix}inbox:${options.nodeId}`;
    this.replyChannel = `${this.prefix}reply:${options.nodeId}`;
    this.queue = new SharedQueue(redis, this.prefix, options.nodeId, options.maxQueuedPerTarget, options.logger, (outcome) => this.finishQueued(outcome));
    this.batch = new RedisBatch(redis, options.logger);
    this.dedupe = new SharedDedupe(this.batch, this.prefix, options.dedupeWindowMs);
    this.lifecycle = new SharedLifecycle(
      redis,
      { identities: this.key(IDENTITIES_KEY), seen: this.key(IDENTITY_SEEN_KEY), banned: this.key(BANNED_KEY), presence: this.key('presence'), control: this.key('control'), removedPrefix: this.key('removed:') },
      options.nodeId,
      (id) => this.queue.take(id),
    );
    this.authFailures = new SharedThrottle(redis, this.prefix, (message) => this.redis.publish(this.key('control'), JSON.stringify(message)), options.logger);
    this.identities = IdentityStore.fromDocs(
      docs,
      { write: (doc) => this.writeIdentity(doc), remove: (id) => this.sharedIdentities.remove(id), close: () => Promise.resolve() },
      options.logger,
    );
  }

  get nodeId(): string {
    return this.options.nodeId;
  }

  private get seenShareMs(): number {
    return this.options.seenShareMs ?? SEEN_SHARE_MS;
  }

  get available(): boolean {
    return !this.closed && this.redis.status === 'ready' && this.sub.status === 'ready';
  }

  /** Joins the cluster: refused when Redis cannot be reached or another running node has this id. */
  static async connect(options: RedisClusterOptions): Promise<RedisCluster> {
    const redis = await connectRedis(options.url, `mimiclaw:${options.nodeId}`);
    let sub: Redis | null = null;
    try {
      sub = await connectRedis(options.url, `mimiclaw:${options.nodeId}:sub`);
      const prefix = clusterPrefix(options.clusterName);
      const keys = { identities: prefix + IDENTITIES_KEY, seen: prefix + IDENTITY_SEEN_KEY, revision: prefix + IDENTITY_REVISION_KEY, banned: prefix + BANNED_KEY, control: prefix + 'control', removedPrefix: prefix + 'removed:' };
      const sharedIdentities = new SharedIdentities(redis, keys, options.nodeId);
      const cluster = new RedisCluster(options, redis, sub, sharedIdentities, await sharedIdentities.readAll());
      await cluster.claimNodeId();
      await cluster.subscribe();
      await cluster.loadPresence();
      // The nodes already running, before the first client can route through this one.
      await cluster.findDeadNodes();
      cluster.start();
      return cluster;
    } catch (error) {
      redis.disconnect();
      sub?.disconnect();
      throw error;
    }
  }

  attach(handlers: ClusterHandlers): void {
    this.handlers = handlers;
  }

  // ---- keys ----------------------------------------------------------------------------------

  private key(name: string): string {
    return this.prefix + name;
  }

  private nodeKey(nodeId: string): string {
    return this.key(`node:${nodeId}`);
  }

  // ---- node registry -------------------------------------------------------------------------

  /**
   * SET NX with this process's token. A key left by this node id's previous process (killed
   * without a clean stop) expires within NODE_TTL_MS, so wait that long before refusing: only a
   * node that is still running keeps it.
   */
  private async claimNodeId(): Promise<void> {
    const deadline = Date.now() + NODE_TTL_MS + HEARTBEAT_MS;
    for (;;) {
      const set = await this.redis.set(this.nodeKey(this.nodeId), this.token, 'PX', NODE_TTL_MS, 'NX');
      if (set === 'OK') break;
      if (Date.now() > deadline) {
        throw new NodeIdTakenError(
          `Node id "${this.nodeId}" is in use by another running node of cluster "${this.options.clusterName}": give this node its own --node-id (or its own data dir).`,
        );
      }
      await delay(250);
    }
    // Presence this node id left behind when its previous process died: it holds no socket yet.
    await this.redis.eval(BURY_SCRIPT, 3, this.key('presence'), this.key(`presence:${this.nodeId}`), this.key('nodes'), this.nodeId);
    await this.redis.sadd(this.key('nodes'), this.nodeId);
  }

  private async subscribe(): Promise<void> {
    this.sub.on('message', (channel: string, text: string) => this.onMessage(channel, text));
    await this.sub.subscribe(this.key(`inbox:${this.nodeId}`), this.key(`reply:${this.nodeId}`), this.key('control'));
  }

  private async loadPresence(): Promise<void> {
    const entries = await this.redis.hgetall(this.key('presence'));
    this.presence.clear();
    for (const [id, node] of Object.entries(entries)) this.presence.set(id, node);
  }

  locate(id: string): string | undefined {
    return this.presence.get(id);
  }

  onlineIds(): Iterable<string> {
    return this.presence.keys();
  }

  onlineCount(): number {
    return this.presence.size;
  }

  private start(): void {
    this.heartbeat = setInterval(() => void this.tick(), HEARTBEAT_MS);
    this.heartbeat.unref();
    this.seenTimer = setInterval(() => this.shareSeen(), this.seenShareMs);
    this.seenTimer.unref();
    // After Redis comes back (a restart, a network cut), write this node's part of the shared
    // state again: its key and the presence of every socket it holds.
    this.redis.on('ready', () => void this.resync());
    // The running nodes count this one at once, not at their next sweep: a broadcast from them
    // in the meantime would miss its sockets.
    this.publish('control', { t: 'node_up', node: this.nodeId });
    void this.tick();
  }

  private async tick(): Promise<void> {
    if (this.ticking || this.closed || this.redis.status !== 'ready') return;
    this.ticking = true;
    try {
      const held = await this.redis.eval(HEARTBEAT_SCRIPT, 2, this.nodeKey(this.nodeId), this.key('nodes'), this.token, NODE_TTL_MS, this.nodeId);
      if (held === 0) this.options.logger.error('node_id_taken', { node: this.nodeId, cluster: this.options.clusterName });
      await this.findDeadNodes();
      // Readers here keep every node subscribed (and lingering) while they read.
      if (this.eventSink !== null && this.eventsWanted()) this.publish('control', { t: 'events_on', node: this.nodeId });
      await this.followEvents();
      await this.queue.expireDue();
      this.lifecycle.sweep();
    } catch (error) {
      this.options.logger.warn('cluster_heartbeat_failed', { error: (error as Error).message });
    } finally {
      this.ticking = false;
    }
  }

  /** Identities active here are seen as active on every node's /admin/workforce (heartbeat staleness). */
  private shareSeen(): void {
    const now = Date.now();
    if (now - this.seenSharedAt < this.seenShareMs || this.handlers === null || this.closed || this.redis.status !== 'ready') return;
    this.seenSharedAt = now;
    const seen = this.handlers.recentlySeen();
    if (seen.length > 0) this.publish('control', { t: 'seen', node: this.nodeId, seen });
  }

  private async findDeadNodes(): Promise<void> {
    const nodes = (await this.redis.smembers(this.key('nodes'))).filter((id) => id !== this.nodeId);
    if (nodes.length === 0) {
      this.liveNodes = [];
      return;
    }
    const exists = await this.redis.mget(nodes.map((id) => this.nodeKey(id)));
    const live: string[] = [];
    for (const [index, id] of nodes.entries()) {
      if (exists[index] !== null) {
        live.push(id);
        continue;
      }
      const removed = await this.redis.eval(BURY_SCRIPT, 3, this.key('presence'), this.key(`presence:${id}`), this.key('nodes'), id);
      this.publish('control', { t: 'buried', node: id });
      this.options.logger.warn('cluster_node_dead', { node: id, presence_removed: Number(removed) });
    }
    this.liveNodes = live;
  }

  private async resync(): Promise<void> {
    if (this.closed) return;
    try {
      await this.redis.eval(HEARTBEAT_SCRIPT, 2, this.nodeKey(this.nodeId), this.key('nodes'), this.token, NODE_TTL_MS, this.nodeId);
      await this.loadPresence();
      // Sessions this node already holds are announced again, never refused by the limit.
      await Promise.all([...(this.handlers?.heldIds() ?? [])].map((id) => this.joined(id, Number.MAX_SAFE_INTEGER)));
      this.options.logger.info('cluster_resynced', { node: this.nodeId });
    } catch (error) {
      this.options.logger.warn('cluster_resync_failed', { error: (error as Error).message });
    }
  }

  // ---- presence ------------------------------------------------------------------------------

  async joined(id: string, maxSessions: number): Promise<boolean> {
    const before = this.presence.get(id);
    this.presence.set(id, this.nodeId);
    const attempt = this.order.joining(id);
    let token: number;
    try {
      const presenceKeys = [this.key('presence'), this.key(`presence:${this.nodeId}`), this.key('presence-token')];
      token = Number(await this.redis.eval(JOIN_SCRIPT, 3, ...presenceKeys, id, this.nodeId, this.key('presence:'), maxSessions));
    } catch (error) {
      this.order.failed(id, attempt);
      this.options.logger.warn('cluster_presence_failed', { id, error: (error as Error).message });
      throw error;
    }
    if (token < 0) {
      // The cluster is at --max-connections: the session is refused, presence stays as it was.
      this.order.failed(id, attempt);
      if (this.presence.get(id) === this.nodeId) {
        if (before === undefined) this.presence.delete(id);
        else this.presence.set(id, before);
      }
      return false;
    }
    const standing = this.order.joinedAs(id, attempt, token);
    // A later join of this node took over: it announces itself.
    if (standing === 'stale') return true;
    // A newer session on another node was announced while this join was on its way.
    if (standing === 'replaced') {
      this.handlers?.replacedElsewhere(id);
      return true;
    }
    this.presence.set(id, this.nodeId);
    this.publish('control', { t: 'replace', node: this.nodeId, id, token });
    return true;
  }

  left(id: string): void {
    if (this.presence.get(id) === this.nodeId) this.presence.delete(id);
    const token = this.order.left(id);
    this.redis
      .eval(LEAVE_SCRIPT, 2, this.key('presence'), this.key(`presence:${this.nodeId}`), id, this.nodeId)
      .then(() => this.publish('control', { t: 'left', node: this.nodeId, id, token }))
      .catch((error: Error) => this.options.logger.warn('cluster_presence_failed', { id, error: error.message }));
  }

  // ---- identities ----------------------------------------------------------------------------

  /**
   * A document change with its revision, or only liveness (lib/redis-identities.ts); announced
   * from Redis. Bans are kept apart (set `banned`), so a stale replica's write can never undo one;
   * a removed identity's tombstone refuses the write (lib/redis-lifecycle.ts).
   */
  private async writeIdentity(doc: IdentityDoc): Promise<void> {
    if (this.lifecycle.isBuried(doc._id)) return;
    const overtaken = await this.sharedIdentities.write(doc);
    if (overtaken !== null) this.handlers?.identityWritten(overtaken);
  }

  removeIdentity(id: string, by: string, onlyOffline: boolean): Promise<SharedRemoval | null> {
    return this.lifecycle.remove(id, by, onlyOffline);
  }

  keyRotated(id: string, by: string): Promise<string | null> {
    return this.lifecycle.rotated(id, by);
  }

  async fetchIdentity(id: string): Promise<Identity | undefined> {
    if (this.lifecycle.isBuried(id)) return undefined;
    return this.sharedIdentities.read(id);
  }

  async setBanned(identity: Identity, banned: boolean, by: string): Promise<void> {
    const set = this.key(BANNED_KEY);
    const multi = this.redis.multi();
    if (banned) multi.sadd(set, identity.id);
    else multi.srem(set, identity.id);
    multi.publish(this.key('control'), JSON.stringify({ t: 'ban', node: this.nodeId, id: identity.id, banned, by }));
    await multi.exec();
  }

  // ---- delivery across nodes -----------------------------------------------------------------

  /**
   * The holder of each target is taken from the presence mirror when it names one (no round
   * trip on the message path); targets the mirror does not place are looked up in Redis. A
   * target the mirror sent to the wrong node (it moved a moment ago) comes back "offline" and is
   * looked up and asked once more, so a stale mirror never turns into a false failure.
   */
  deliverElsewhere(pieces: FramePieces, ids: readonly string[]): Promise<Record<string, RemoteOutcome>> {
    // The usual case: the mirror places every target on one other node. One request, no lookup.
    const node = ids.length > 0 ? this.presence.get(ids[0]!) : undefined;
    if (node === undefined || node === this.nodeId || !ids.every((id) => this.presence.get(id) === node)) return this.deliverAnywhere(pieces, ids);
    const targets = [...ids];
    return this.request(node, (req) => ({ t: 'deliver', req, reply: this.nodeId, ids: targets, queueable: pieces.queueable }), pieces).then((reply) => {
      const outcomes: Record<string, RemoteOutcome> = {};
      let missed: string[] | null = null;
      for (const id of targets) {
        const outcome = reply?.outcomes?.[id] ?? 'offline';
        outcomes[id] = outcome;
        if (outcome === 'offline') (missed ??= []).push(id);
      }
      if (missed === null) return outcomes;
      return this.askMoved(pieces, missed, new Map(missed.map((id) => [id, node])), outcomes).then(() => outcomes);
    });
  }

  private async deliverAnywhere(pieces: FramePieces, ids: readonly string[]): Promise<Record<string, RemoteOutcome>> {
    const outcomes: Record<string, RemoteOutcome> = {};
    const byNode = new Map<string, string[]>();
    const unplaced: string[] = [];
    for (const id of ids) {
      outcomes[id] = 'offline';
      const node = this.presence.get(id);
      if (node === undefined || node === this.nodeId) unplaced.push(id);
      else addTo(byNode, node, id);
    }
    const asked = new Map<string, string>();
    if (unplaced.length > 0) for (const [node, targets] of await this.locateInStore(unplaced)) for (const id of targets) addTo(byNode, node, id);
    await this.askHolders(pieces, byNode, outcomes, asked);
    const missed = ids.filter((id) => outcomes[id] === 'offline' && asked.has(id) && !unplaced.includes(id));
    if (missed.length > 0) await this.askMoved(pieces, missed, asked, outcomes);
    return outcomes;
  }

  /** Targets the mirror placed on a node that answered "offline": asked once more where Redis says they are now. */
  private async askMoved(pieces: FramePieces, missed: readonly string[], asked: Map<string, string>, outcomes: Record<string, RemoteOutcome>): Promise<void> {
    const again = new Map<string, string[]>();
    for (const [node, targets] of await this.locateInStore(missed)) for (const id of targets) if (asked.get(id) !== node) addTo(again, node, id);
    if (again.size > 0) await this.askHolders(pieces, again, outcomes, asked);
  }

  /** Holders from Redis (HMGET presence); none when Redis cannot answer: those targets stay offline. */
  private async locateInStore(ids: readonly string[]): Promise<Map<string, string[]>> {
    const holders = await this.redis.hmget(this.key('presence'), ...ids).catch(() => ids.map(() => null));
    const byNode = new Map<string, string[]>();
    ids.forEach((id, index) => {
      const node = holders[index];
      if (node !== null && node !== undefined && node !== this.nodeId) addTo(byNode, node, id);
    });
    return byNode;
  }

  private async askHolders(pieces: FramePieces, byNode: Map<string, string[]>, outcomes: Record<string, RemoteOutcome>, asked: Map<string, string>): Promise<void> {
    await Promise.all(
      [...byNode].map(async ([node, targets]) => {
        for (const id of targets) asked.set(id, node);
        const reply = await this.request(node, (req) => ({ t: 'deliver', req, reply: this.nodeId, ids: targets, queueable: pieces.queueable }), pieces);
        // Only what the holder says it wrote counts as delivered; no answer leaves them offline.
        for (const id of targets) {
          const outcome = reply?.outcomes?.[id];
          if (outcome !== undefined) outcomes[id] = outcome;
        }
      }),
    );
  }

  async broadcastElsewhere(pieces: FramePieces, senderId: string): Promise<string[]> {
    const replies = await Promise.all(
      this.liveNodes.map((node) => this.request(node, (req) => ({ t: 'broadcast', req, reply: this.nodeId, sender: senderId }), pieces)),
    );
    return replies.flatMap((reply) => reply?.reached ?? []);
  }

  answerQueries(handler: QueryHandler): void {
    this.queryHandler = handler;
  }

  /** Asks every other live node; the results that came back in time and the nodes that did not answer. */
  async askAll(kind: string, query: unknown): Promise<{ results: unknown[]; missing: string[] }> {
    const nodes = [...this.liveNodes];
    const replies = await Promise.all(nodes.map((node) => this.request(node, (req) => ({ t: 'query', req, reply: this.nodeId, kind, query }))));
    const results: unknown[] = [];
    const missing: string[] = [];
    replies.forEach((reply, index) => {
      if (reply !== null && reply.result !== undefined) results.push(reply.result);
      else missing.push(nodes[index]!);
    });
    return { results, missing };
  }

  /** Publishes on `node`'s inbox and waits for its answer; null when none came in time. */
  private request(node: string, make: (req: string) => InboxMessage, pieces: FramePieces | null = null): Promise<ReplyMessage | null> {
    const req = `${this.nodeId}:${(this.requestSeq++).toString(36)}`;
    const answered = new Promise<ReplyMessage | null>((resolve) => {
      this.pending.set(req, { deadline: performance.now() + REPLY_TIMEOUT_MS, answer: resolve });
    });
    this.watchReplies();
    this.batch.publish(
      this.key(`inbox:${node}`),
      encodeInboxRequest(make(req) as unknown as Record<string, unknown>, pieces),
      (receivers) => {
        // Nobody listens on that inbox (or Redis did not take it): there is nothing to wait for.
        if (receivers === 0) this.settleRequest(req, { req });
      },
      true,
    );
    return answered;
  }

  private settleRequest(req: string, reply: ReplyMessage | null): void {
    const request = this.pending.get(req);
    if (request === undefined) return;
    this.pending.delete(req);
    request.answer(reply);
  }

  /**
   * Every request waits REPLY_TIMEOUT_MS and they are kept in the order sent, so one timer for
   * the oldest serves them all (no timer set and cleared per message).
   */
  private watchReplies(): void {
    if (this.replyTimer !== null) return;
    const oldest = this.pending.values().next();
    if (oldest.done === true) return;
    this.replyTimer = setTimeout(() => {
      this.replyTimer = null;
      const now = performance.now();
      for (const [req, request] of this.pending) {
        if (request.deadline > now) break;
        this.settleRequest(req, null);
      }
      this.watchReplies();
    }, Math.max(0, oldest.value.deadline - performance.now()));
    // A pending request does not keep the process alive by itself (the sockets do).
    this.replyTimer.unref();
  }

  private onMessage(channel: string, text: string): void {
    if (this.handlers === null) return;
    // Requests and replies come batched: one message per sending node and event-loop turn.
    if (channel === this.inboxChannel) {
      const requests = decodeInbox(text, (why) => this.options.logger.error('cluster_message_failed', { channel, error: why }));
      for (const request of requests) {
        try {
          this.onInbox(request.meta as unknown as InboxMessage, request.pieces);
        } catch (error) {
          this.options.logger.error('cluster_message_failed', { channel, error: (error as Error).message });
        }
      }
      return;
    }
    if (channel === this.replyChannel) {
      for (const item of splitItems(parseJson(text))) {
        if (!isPlainObject(item)) continue;
        try {
          this.onReply(item as unknown as ReplyMessage);
        } catch (error) {
          this.options.logger.error('cluster_message_failed', { channel, error: (error as Error).message });
        }
      }
      return;
    }
    const message = parseObject(text);
    if (message === null) return;
    try {
      if (channel === this.key('control')) this.onControl(message as ControlMessage);
      else if (channel === this.key('events')) this.onEvent(message);
    } catch (error) {
      this.options.logger.error('cluster_message_failed', { channel, error: (error as Error).message });
    }
  }

  /** Answers a request on the asker's reply channel, batched with this turn's other answers. */
  private answer(asker: string, reply: ReplyMessage): void {
    this.batch.publish(this.key(`reply:${asker}`), JSON.stringify(reply), () => undefined);
  }

  private onInbox(message: InboxMessage, pieces: FramePieces | null): void {
    const handlers = this.handlers!;
    if (typeof message.req !== 'string' || typeof message.reply !== 'string') return;
    if (message.t === 'query') {
      const { req, reply: replyTo } = message;
      const answer = this.queryHandler ? this.queryHandler(String(message.kind), message.query) : Promise.reject(new Error('no query handler'));
      answer.then(
        (result) => this.answer(replyTo, { req, result }),
        (error: Error) => this.options.logger.warn('cluster_query_failed', { kind: String(message.kind), error: error.message }),
      );
      return;
    }
    if (pieces === null) return;
    let reply: ReplyMessage;
    if (message.t === 'deliver' && Array.isArray(message.ids)) {
      reply = { req: message.req, outcomes: handlers.deliverHere(pieces, message.ids.filter((id): id is string => typeof id === 'string')) };
    } else if (message.t === 'broadcast' && typeof message.sender === 'string') {
      reply = { req: message.req, reached: handlers.broadcastHere(pieces, message.sender) };
    } else {
      return;
    }
    this.answer(message.reply, reply);
  }

  private onReply(reply: ReplyMessage): void {
    if (typeof reply.req === 'string') this.settleRequest(reply.req, reply);
  }

  private onControl(message: ControlMessage): void {
    const handlers = this.handlers!;
    switch (message.t) {
      case 'replace': {
        if (typeof message.id !== 'string' || typeof message.node !== 'string') return;
        const token = typeof message.token === 'number' ? message.token : undefined;
        if (message.node === this.nodeId) {
          if (this.order.announcedHere(message.id, token)) this.presence.set(message.id, message.node);
          return;
        }
        // A late announcement of an older session neither closes a newer one here nor moves the mirror back.
        const verdict = this.order.announcedElsewhere(message.id, token);
        if (verdict.moveMirror) this.presence.set(message.id, message.node);
        if (verdict.closeHeld) handlers.replacedElsewhere(message.id);
        return;
      }
      case 'left':
        if (typeof message.id !== 'string' || this.presence.get(message.id) !== message.node) return;
        if (this.order.leftElsewhere(message.id, typeof message.token === 'number' ? message.token : undefined)) this.presence.delete(message.id);
        return;
      case 'seen':
        if (message.node !== this.nodeId && Array.isArray(message.seen)) {
          handlers.seenElsewhere(
            message.seen.filter(
              (entry): entry is [string, number, number | null] =>
                Array.isArray(entry) && typeof entry[0] === 'string' && typeof entry[1] === 'number' && (entry[2] === null || typeof entry[2] === 'number'),
            ),
          );
        }
        return;
      case 'node_up':
        if (typeof message.node === 'string' && message.node !== this.nodeId && !this.liveNodes.includes(message.node)) this.liveNodes = [...this.liveNodes, message.node];
        return;
      case 'events_on':
        this.eventsMutedUntil = 0;
        this.eventsReadersAnnounced++;
        this.eventsHeard = true;
        this.eventsProbing = false;
        // Every node's ring holds the cluster's events while some node has readers (and for a
        // while after), so a stream can resume on any node: subscribe now, not at the heartbeat.
        this.eventsLingerUntil = Date.now() + EVENTS_LINGER_MS;
        if (this.eventSink !== null && !this.eventsSubscribed && !this.closed) {
          this.eventsSubscribed = true;
          this.sub.subscribe(this.key('events')).catch(() => {
            this.eventsSubscribed = false;
          });
        }
        return;
      case 'buried':
        for (const [id, node] of this.presence) if (node === message.node) this.presence.delete(id);
        return;
      case 'identity':
        // Only a revision newer than the replica's (an older change announced late is not taken back
        // in), and never a removed identity's.
        if (message.node !== this.nodeId && isPlainObject(message.doc) && !this.lifecycle.isBuried(String(message.doc._id)) && this.sharedIdentities.accept(message.doc)) handlers.identityWritten(message.doc);
        return;
      case 'removed':
        if (typeof message.id !== 'string') return;
        this.lifecycle.bury(message.id);
        this.sharedIdentities.forget(message.id);
        if (message.node !== this.nodeId) handlers.identityRemoved(message.id, String(message.by));
        return;
      case 'throttled':
        this.authFailures.heard(message);
        return;
      case 'rotated':
        if (message.node !== this.nodeId && typeof message.id === 'string') handlers.keyRotatedElsewhere(message.id, String(message.by));
        return;
      case 'identity_seen': {
        const identity = message.node !== this.nodeId && typeof message.id === 'string' ? this.identities.get(message.id) : undefined;
        if (identity !== undefined && isPlainObject(message.seen)) raiseLiveness(identity, readLiveness(message.seen));
        return;
      }
      case 'ban':
        if (message.node !== this.nodeId && typeof message.id === 'string') handlers.banChanged(message.id, message.banned === true, String(message.by));
        return;
      case 'queued':
        if (Array.isArray(message.ids)) for (const id of message.ids) if (typeof id === 'string') handlers.queuedFor(id);
        return;
      case 'queued_outcome':
        if (typeof message.origin === 'string' && typeof message.from_id === 'string' && typeof message.target_id === 'string') {
          handlers.queuedOutcome({
            origin: message.origin,
            record_id: String(message.record_id),
            msg_id: String(message.msg_id),
            from_id: message.from_id,
            target_id: message.target_id,
            status: message.status === 'expired' ? 'expired' : 'delivered',
          });
        }
        return;
    }
  }

  private publish(channel: string, message: object): void {
    this.redis.publish(this.key(channel), JSON.stringify(message)).catch((error: Error) => {
      this.options.logger.warn('cluster_publish_failed', { channel, error: error.message });
    });
  }

  // ---- events --------------------------------------------------------------------------------

  /**
   * Feeds other nodes' events to `sink` while `wanted()` (someone reads /api/events here) or some
   * node announced a reader within EVENTS_LINGER_MS: the node is subscribed to the events channel
   * only then, so a stream can resume on any node with exactly what it missed.
   */
  streamEvents(sink: SharedEventsSink, wanted: () => boolean): void {
    this.eventSink = sink;
    this.eventsWanted = wanted;
  }

  /**
   * Shares one of this node's events. When no node listens (PUBLISH reached nobody) publishing
   * pauses for a heartbeat, so a cluster without /api/events readers pays one check per event.
   * After the pause one publish asks again; until it is answered the events are not published
   * (as during the pause), rather than one publish per message for a round trip. A reader's
   * arrival (`events_on`) ends the pause and the asking at once.
   */
  shareEvent(event: RelayEvent, seq: number): void {
    if (this.eventsProbing || this.closed || (this.eventsMutedUntil !== 0 && Date.now() < this.eventsMutedUntil) || this.redis.status !== 'ready') return;
    const readersAnnounced = this.eventsReadersAnnounced;
    const probe = !this.eventsHeard;
    if (probe) this.eventsProbing = true;
    this.redis.publish(this.key('events'), JSON.stringify({ node: this.nodeId, seq, event })).then(
      (receivers) => {
        // A reader announced meanwhile has subscribed after this publish: no pause.
        if (readersAnnounced !== this.eventsReadersAnnounced) return;
        if (probe) this.eventsProbing = false;
        this.eventsHeard = receivers > 0;
        if (receivers === 0) this.eventsMutedUntil = Date.now() + HEARTBEAT_MS;
      },
      () => {
        if (probe && readersAnnounced === this.eventsReadersAnnounced) this.eventsProbing = false;
      },
    );
  }

  /**
   * A reader is arriving at this node's /api/events: subscribe now rather than at the next
   * heartbeat, and tell the nodes that had stopped publishing (nobody listened) to start again.
   */
  async listenToEventsNow(): Promise<void> {
    this.eventsSubscribed = true;
    await this.sub.subscribe(this.key('events'));
    await this.redis.publish(this.key('control'), JSON.stringify({ t: 'events_on', node: this.nodeId }));
    // Answer the reader once every live node has subscribed too (each holds one subscriber
    // connection), so their rings hold what the stream is sent and it can resume on any of them.
    const deadline = Date.now() + EVENTS_SUBSCRIBED_WAIT_MS;
    while (!this.closed && Date.now() < deadline) {
      const counts = (await this.redis.pubsub('NUMSUB', this.key('events'))) as unknown[];
      if (Number(counts[1]) >= this.liveNodes.length + 1) return;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  private async followEvents(): Promise<void> {
    const wanted = this.eventSink !== null && (this.eventsWanted() || Date.now() < this.eventsLingerUntil);
    if (wanted === this.eventsSubscribed) return;
    this.eventsSubscribed = wanted;
    if (wanted) await this.sub.subscribe(this.key('events'));
    else {
      this.eventSink?.stopHearing();
      await this.sub.unsubscribe(this.key('events'));
    }
  }

  private onEvent(message: Record<string, unknown>): void {
    if (message.node === this.nodeId || !this.eventsSubscribed) return;
    const event = message.event;
    if (typeof message.node === 'string' && Number.isSafeInteger(message.seq) && isPlainObject(event) && typeof event.type === 'string') {
      this.eventSink?.receiveShared(message.node, message.seq as number, event as unknown as RelayEvent);
    }
  }

  // ---- store-and-forward (lib/redis-queue.ts) and dedupe (lib/redis-dedupe.ts) ---------------

  enqueue(entries: readonly NewQueuedEntry[]): Promise<void> {
    return this.queue.enqueue(entries);
  }

  wake(ids: readonly string[]): void {
    this.publish('control', { t: 'queued', ids: [...new Set(ids)] });
  }

  /** The queued copies the cluster store holds (for /metrics). */
  queuedCopies(): Promise<number> {
    return this.queue.depth();
  }

  takeQueued(id: string): Promise<SharedQueuedEntry[]> {
    return this.queue.take(id);
  }

  returnQueued(id: string, entries: readonly SharedQueuedEntry[]): Promise<void> {
    return this.queue.giveBack(id, entries);
  }

  finishQueued(outcome: QueuedOutcome): void {
    this.publish('control', { t: 'queued_outcome', ...outcome });
  }

  claimMsgId(senderId: string, msgId: string): Promise<DedupeClaim> {
    return this.dedupe.claim(senderId, msgId);
  }

  settleMsgId(senderId: string, msgId: string, outcome: string): void {
    this.dedupe.settle(senderId, msgId, outcome);
  }

  releaseMsgId(senderId: string, msgId: string): void {
    this.dedupe.release(senderId, msgId);
  }

  // ---- stop ----------------------------------------------------------------------------------

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.seenTimer) clearInterval(this.seenTimer);
    for (const req of [...this.pending.keys()]) this.settleRequest(req, { req: '' });
    if (this.replyTimer !== null) clearTimeout(this.replyTimer);
    try {
      if (this.redis.status === 'ready') {
        await this.redis.eval(RELEASE_SCRIPT, 2, this.nodeKey(this.nodeId), this.key('nodes'), this.token, this.nodeId);
      }
    } catch (error) {
      this.options.logger.warn('cluster_release_failed', { error: (error as Error).message });
    }
    this.closed = true;
    await Promise.all([closeRedis(this.redis), closeRedis(this.sub)]);
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return null;
  }
}

function addTo(map: Map<string, string[]>, key: string, value: string): void {
  const list = map.get(key);
  if (list) list.push(value);
  else map.set(key, [value]);
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
