// Routing between authenticated identities: auth decisions, presence, message delivery with
// its ack, store-and-forward for offline targets, idempotent resend and bans. The gateway
// (ws-gateway.ts) hands it validated-JSON frames; everything here trusts lib/protocol's types.

import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import { presented, type GuessTarget } from './auth-throttle';
import { AUTHKEY_CREDENTIAL, type BossKeys } from './boss-keys';
import type { ClusterHandlers, ClusterLink, DedupeClaim, FramePieces, QueuedOutcome, RemoteOutcome, SharedQueuedEntry } from './cluster-link';
import type { ConnectionLog } from './connection-log';
import type { DedupeCache, Remembered } from './dedupe-cache';
import { ackPrefix, finishAck, outcomeFields } from './delivery-ack';
import type { DeliveryQueue, HeldEntries, NewQueuedEntry, QueuedEntry } from './delivery-queue';
import type { SubmitResult } from './dispatch';
import type { EventBus, NodeRef } from './events';
import { toDoc, type Identity, type IdentityStore } from './identity-store';
import type { Logger } from './logger';
import type { MessageLog } from './message-log';
import type { ResolvedOptions } from './options';
import {
  CLOSE_CODES,
  checkCapacity,
  checkEmployeeProfile,
  checkInReplyTo,
  checkPriority,
  checkStatusFrame,
  checkTaskTimeout,
  checkIdentity,
  checkRole,
  checkTarget,
  isPlainObject,
  type Checked,
  type DeliveryFailure,
  type FrameError,
  type ParsedTarget,
  type Priority,
  type ProtocolErrorCode,
  type Role,
} from './protocol';
import type { Session } from './session';
import { SharedBacklogs } from './shared-backlog';
import type { TaskDispatch } from './task-dispatch';
import { splitText, type SplitText } from './ws-frame';

/**
 * Most queued entries a drain writes to one target before that batch's removal is on disk: a
 * crash mid-drain delivers at most this many of its entries again after the restart.
 */
export const DRAIN_BATCH_ENTRIES = 256;

const MAX_META_BYTES = 16 * 1024;
const MAX_MSG_ID_LENGTH = 256;

export interface RouterDeps {
  options: ResolvedOptions;
  identities: IdentityStore;
  connectionLog: ConnectionLog;
  messageLog: MessageLog;
  queue: DeliveryQueue;
  dedupe: DedupeCache;
  /** Other nodes: SingleNode when there are none. */
  cluster: ClusterLink;
  dispatcher: TaskDispatch;
  bus: EventBus;
  logger: Logger;
  /** Named boss credentials (--boss-keys-file), accepted beside the authkey. */
  bossKeys?: BossKeys | null;
}

/**
 * Called once an auth is decided: accepted (the session has its identity) or not. A promise
 * holds a rejection's answer until it resolves (a cluster counting the wrong secret across nodes).
 */
export type AuthSettled = (accepted: boolean, wrong: GuessTarget | null) => Promise<void> | undefined;

const CLUSTER_UNAVAILABLE = 'The cluster store (Redis) cannot be reached from this node right now; retry in a few seconds.';

/** When and how big a frame arrived. */
export interface FrameArrival {
  bytes: number;
  /** Wall clock, ms. */
  receivedAt: number;
  /** performance.now() at receipt, for the routing-latency histogram. */
  startedAt: number;
}

/** Why an identity was removed: an admin's delete, --forget-offline-after, or the end of an ephemeral one's connection. */
export type RemovalReason = 'deleted' | 'forgotten' | 'ephemeral';

export type AdminFailure = { ok: false; status: 404 | 503; code: string; message: string };

export type DeleteResult = { ok: true; identity: Identity; wasOnline: boolean; droppedQueued: number; written: Promise<void> } | AdminFailure;

export type RotateResult = { ok: true; identity: Identity; key: string; wasOnline: boolean; written: Promise<void> } | AdminFailure;

export type BanResult =
  | { ok: true; identity: Identity; online: boolean }
  | { ok: false; status: 404 | 409 | 503; code: string; message: string };

export function nodeRef(identity: Identity): NodeRef {
  return { id: identity.id, role: identity.role, name: identity.name, tags: identity.tags };
}

export function secretMatches(given: unknown, expected: string): boolean {
  if (typeof given !== 'string') return false;
  // Compare digests, not the strings, so the time taken reveals neither a prefix nor the length.
  return timingSafeEqual(digest(given), digest(expected));
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** A rejected auth; `wrong` names the secret it got wrong, when that is why it was rejected. */
type AuthRejection = FrameError & { wrong?: GuessTarget };

interface AuthAccepted {
  identity: Identity;
  key: string;
  reconnected: boolean;
  /** The boss credential the auth presented (AUTHKEY_CREDENTIAL or a --boss-keys-file name); null for an employee. */
  credential: string | null;
}

/** A message to `any:<tag>` as routing has read it. */
interface TaskMessage {
  msgId: string;
  clientGaveId: boolean;
  payloadJson: string | undefined;
  now: number;
  /** Cluster: this node holds the cluster-wide dedupe claim on the msg_id and must settle it. */
  claimed: boolean;
}

interface RouteContext {
  sender: Identity;
  msgId: string;
  head: string;
  tail: string;
  /** head and tail encoded, made at the first delivery. */
  split: SplitText | null;
  queueTtlMs: number;
  /** Part C: orders the message in a target's queue when it is queued. */
  priority: Priority;
  now: number;
  delivered: string[];
  failed: DeliveryFailure[];
  queued: string[];
  toQueue: NewQueuedEntry[];
  /** Cluster: targets this node does not hold (or does not know), to ask the other nodes about. */
  elsewhere: string[] | null;
  /** Cluster: a broadcast, to repeat on every other node. */
  broadcast: boolean;
}

export class Router implements ClusterHandlers {
  /** Authenticated sessions by identity id. */
  readonly online = new Map<string, Session>();
  private readonly pausedForLog = new Set<Session>();
  /** Read once: on a single node every cluster step is skipped by this one test. */
  private readonly clustered: boolean;
  /** Sessions whose queued backlog is being written, waiting for a removal batch or for socket room. */
  private readonly draining = new Set<Session>();
  /** Cluster: sessions draining their shared queue; true when another drain was asked meanwhile. */
  private readonly drainingShared = new Map<Session, boolean>();
  /** Cluster: sessions with queued copies still to write; a new message that may be queued goes behind them. */
  private readonly sharedBacklogs: SharedBacklogs<Session> = new SharedBacklogs((session) => {
    if (session.isOpen && this.online.get(session.identity!.id) === session) this.drainShared(session);
    else this.sharedBacklogs.end(session);
  });

  constructor(private readonly deps: RouterDeps) {
    this.clustered = deps.cluster.clustered;
    deps.messageLog.onDrain(() => {
      for (const session of this.pausedForLog) session.ws.resume();
      this.pausedForLog.clear();
    });
    deps.bossKeys?.onRevoked((names) => this.closeRevokedBosses(names));
    deps.cluster.attach(this);
  }

  get nodeId(): string {
    return this.deps.cluster.nodeId;
  }

  get options(): ResolvedOptions {
    return this.deps.options;
  }

  countOnline(): { boss: number; employee: number } {
    const counts = { boss: 0, employee: 0 };
    for (const session of this.online.values()) counts[session.identity!.role]++;
    return counts;
  }

  /** Online identities of the whole relay: in a cluster, of every node (the presence mirror), roles from the replica. */
  countOnlineEverywhere(): { boss: number; employee: number } {
    if (!this.clustered) return this.countOnline();
    const counts = { boss: 0, employee: 0 };
    for (const id of this.deps.cluster.onlineIds()) {
      // An ephemeral identity of another node is not in this replica: its id names its role.
      const role = this.deps.identities.get(id)?.role ?? (id.startsWith('boss-') ? 'boss' : id.startsWith('employee-') ? 'employee' : undefined);
      if (role !== undefined) counts[role]++;
    }
    return counts;
  }

  /** Sessions of the whole relay, what --max-connections caps: in a cluster, every node's (the presence mirror; no round trip). */
  private sessionCount(): number {
    return this.clustered ? Math.max(this.online.size, this.deps.cluster.onlineCount()) : this.online.size;
  }

  /** The node holding `id`'s session: this one, (cluster) another, or null when offline. */
  locate(id: string): string | null {
    if (this.online.has(id)) return this.deps.cluster.nodeId;
    return this.clustered ? (this.deps.cluster.locate(id) ?? null) : null;
  }

  /** When the identity's open socket last carried a frame or a pong; undefined while offline (on every node, in a cluster). */
  lastActivity(id: string): number | undefined {
    const session = this.online.get(id);
    if (session) return session.lastActivityAt;
    if (!this.clustered || this.deps.cluster.locate(id) === undefined) return undefined;
    // Held by another node: its last activity as shared every few seconds.
    return this.deps.identities.get(id)?.lastSeen;
  }

  /** Online on this node, or (cluster) on any node. */
  isOnline(id: string): boolean {
    return this.online.has(id) || (this.clustered && this.deps.cluster.locate(id) !== undefined);
  }

  // ---- auth ----------------------------------------------------------------------------------

  /**
   * Authenticates the session or rejects the auth (error frame, close 4003), then tells
   * `settled`: accepted, or rejected with the secret it got wrong (for the gateway's throttle;
   * null when it failed for any other reason). In a cluster the answer may come later.
   */
  authenticate(session: Session, frame: Record<string, unknown>, settled: AuthSettled): void {
    if (this.clustered && !this.deps.cluster.available) {
      this.rejectAuth(session, frame, { code: 'cluster_unavailable', message: CLUSTER_UNAVAILABLE });
      settled(false, null);
      return;
    }
    const capacity = checkCapacity(frame.capacity);
    const outcome: AuthRejection | AuthAccepted = capacity.ok ? this.decideAuth(frame) : capacity.error;
    if ('code' in outcome) {
      const unknownId = outcome.code === 'identity_not_found' && isPlainObject(frame.identity) ? frame.identity.id : undefined;
      if (this.clustered && typeof unknownId === 'string') {
        // Registered on another node a moment ago, and not yet in this node's replica.
        this.authAfterFetch(session, frame, unknownId, settled);
        return;
      }
      this.refuseAuth(session, frame, outcome, settled);
      return;
    }
    const { identity, key, reconnected, credential } = outcome;
    const declared = capacity.ok ? capacity.value : undefined;
    session.identity = identity;
    this.noteCredential(identity, credential);
    settled(true, null);
    if (reconnected) {
      this.goOnline(session, identity, key, true, declared);
      return;
    }
    // A new identity is on disk (or in the cluster store) before its key is handed out, so a
    // crash cannot forget an identity its client was already told about.
    this.deps.identities.flush().then(
      () => {
        // An admin may have deleted it meanwhile (it is listed from creation on).
        if (session.isOpen && this.deps.identities.get(identity.id) === identity) this.goOnline(session, identity, key, false, declared);
      },
      () => {
        session.sendError('cluster_unavailable', CLUSTER_UNAVAILABLE);
        session.close(CLOSE_CODES.tryAgainLater, 'cluster_unavailable');
      },
    );
  }

  /** Records which boss credential this auth used (the log, the admin views, revocation). */
  private noteCredential(identity: Identity, credential: string | null): void {
    if (credential === null || identity.credential === credential) return;
    identity.credential = credential;
    this.deps.identities.save(identity);
  }

  private authAfterFetch(session: Session, frame: Record<string, unknown>, id: string, settled: AuthSettled): void {
    this.deps.cluster.fetchIdentity(id).then(
      (found) => {
        if (!session.isOpen) return;
        if (found && !this.deps.identities.get(id)) this.deps.identities.apply(toDoc(found));
        const outcome = this.decideAuth(frame);
        if ('code' in outcome) {
          this.refuseAuth(session, frame, outcome, settled);
          return;
        }
        session.identity = outcome.identity;
        this.noteCredential(outcome.identity, outcome.credential);
        settled(true, null);
        const declared = checkCapacity(frame.capacity);
        this.goOnline(session, outcome.identity, outcome.key, outcome.reconnected, declared.ok ? declared.value : undefined);
      },
      () => {
        if (!session.isOpen) return;
        this.rejectAuth(session, frame, { code: 'cluster_unavailable', message: CLUSTER_UNAVAILABLE });
        settled(false, null);
      },
    );
  }

  /** Rejects the auth once `settled` has counted a wrong secret (at once on a single node). */
  private refuseAuth(session: Session, frame: Record<string, unknown>, outcome: AuthRejection, settled: AuthSettled): void {
    const counted = settled(false, outcome.wrong ?? null);
    if (counted === undefined) this.rejectAuth(session, frame, outcome);
    else void counted.then(() => this.rejectAuth(session, frame, outcome));
  }

  private goOnline(session: Session, identity: Identity, key: string, reconnected: boolean, capacity: number | undefined): void {
    const now = Date.now();
    const previous = this.online.get(identity.id);
    session.ref = nodeRef(identity);
    this.online.set(identity.id, session);
    if (previous && previous !== session) {
      previous.close(CLOSE_CODES.replaced, 'Replaced by a newer session of this identity');
    }
    identity.lastConnectedAt = now;
    identity.lastSeen = now;
    this.deps.identities.save(identity);
    this.deps.connectionLog.record({
      identityId: identity.id,
      role: identity.role,
      event: reconnected ? 'reconnect' : 'auth_ok',
      timestamp: now,
      online: true,
      address: session.address,
      ...(identity.role === 'boss' && identity.credential !== null && { credential: identity.credential }),
    });
    if (!this.clustered) {
      this.welcome(session, identity, key, reconnected, now, capacity);
      return;
    }
    // A client told auth_ok must be reachable from every node: presence first.
    this.deps.cluster.joined(identity.id, this.deps.options.maxConnections).then(
      (admitted) => {
        if (!admitted) {
          // Another node's auth took the last place since this node's presence mirror was checked.
          session.sendError('server_full', serverFullMessage(this.deps.options.maxConnections));
          session.close(CLOSE_CODES.serverFull, 'server_full');
          return;
        }
        if (session.isOpen && this.online.get(identity.id) === session) this.welcome(session, identity, key, reconnected, now, capacity);
      },
      () => {
        session.sendError('cluster_unavailable', CLUSTER_UNAVAILABLE);
        session.close(CLOSE_CODES.tryAgainLater, 'cluster_unavailable');
      },
    );
  }

  private welcome(session: Session, identity: Identity, key: string, reconnected: boolean, now: number, capacity: number | undefined): void {
    session.send({
      type: 'auth_ok',
      id: identity.id,
      key,
      role: identity.role,
      name: identity.name,
      tags: identity.tags,
      reconnected,
      timestamp: now,
    });
    this.deps.bus.publish({
      type: 'connect',
      node: session.ref!,
      reconnected,
      relay_node: this.nodeId,
      at: now,
      ...(identity.role === 'boss' && identity.credential !== null && { credential: identity.credential }),
    });
    if (this.clustered) this.drainShared(session);
    this.deliverQueued(session);
    this.deps.dispatcher.online(identity, capacity);
  }

  /**
   * The boss credential `given` is: AUTHKEY_CREDENTIAL for the relay's authkey, the name of a
   * --boss-keys-file entry, or null. Both are always checked, so the time taken does not tell which.
   */
  private bossCredential(given: unknown): string | null {
    const isAuthkey = secretMatches(given, this.deps.options.authkey);
    const named = typeof given === 'string' ? (this.deps.bossKeys?.match(given) ?? null) : null;
    return isAuthkey ? AUTHKEY_CREDENTIAL : named;
  }

  private decideAuth(frame: Record<string, unknown>): AuthAccepted | AuthRejection {
    const { options, identities } = this.deps;
    const role = checkRole(frame);
    if (!role.ok) return role.error;
    if (role.value === 'boss' && !presented(frame.authkey)) {
      return {
        code: 'invalid_authkey',
        message: 'The authkey is missing: a boss must send the relay\'s authkey as "authkey", also when it reconnects with its identity.',
      };
    }
    const credential = role.value === 'boss' ? this.bossCredential(frame.authkey) : null;
    if (role.value === 'boss' && credential === null) {
      return { code: 'invalid_authkey', message: 'The authkey is not right: a boss must send the relay\'s authkey or its own boss key.', wrong: 'authkey' };
    }
    if (role.value === 'employee' && frame.authkey !== undefined && this.bossCredential(frame.authkey) === null) {
      return {
        code: 'invalid_authkey',
        message: 'The authkey is not right: send the relay\'s authkey or leave it out.',
        ...(presented(frame.authkey) && { wrong: 'authkey' as const }),
      };
    }
    const checkedMeta = this.checkMeta(frame.meta);
    if (!checkedMeta.ok) return checkedMeta.error;
    const meta = checkedMeta.value;
    const credentials = checkIdentity(frame);
    if (!credentials.ok) return credentials.error;
    if (frame.ephemeral !== undefined && typeof frame.ephemeral !== 'boolean') {
      return { code: 'invalid_frame', message: 'Field "ephemeral" must be true or false.' };
    }
    if (frame.ephemeral === true && credentials.value !== undefined) {
      return { code: 'invalid_frame', message: '"ephemeral" applies to a new identity: leave it out when reconnecting with "identity".' };
    }
    const replacing = credentials.value !== undefined && this.isOnline(credentials.value.id);
    if (!replacing && this.sessionCount() >= options.maxConnections) {
      return { code: 'server_full', message: serverFullMessage(options.maxConnections) };
    }
    if (credentials.value === undefined) {
      const registered = this.register(role.value, frame, meta, frame.ephemeral === true);
      return 'code' in registered ? registered : { ...registered, credential };
    }
    const identity = identities.get(credentials.value.id);
    if (!identity) {
      return { code: 'identity_not_found', message: 'No identity has this id: register again without "identity".' };
    }
    if (!identities.keyMatches(identity, credentials.value.key)) {
      return {
        code: 'invalid_identity_key',
        message: 'The identity key does not match: send the key given in auth_ok.',
        wrong: `identity:${identity.id}`,
      };
    }
    if (identity.role !== role.value) {
      return { code: 'role_mismatch', message: `This identity is a ${identity.role}; authenticate with "role":"${identity.role}".` };
    }
    if (identity.banned) {
      return { code: 'banned', message: 'This employee is banned; an admin can unban it with DELETE /employees/:id/ban.' };
    }
    const update = this.profileUpdate(identity, frame);
    if (update !== null && 'code' in update) return update;
    if (update !== null) identities.setProfile(identity, update);
    if (meta !== null) {
      identity.meta = meta;
      identities.save(identity);
    }
    return { identity, key: credentials.value.key, reconnected: true, credential };
  }

  private register(
    role: Role,
    frame: Record<string, unknown>,
    meta: Record<string, unknown> | null,
    ephemeral: boolean,
  ): { identity: Identity; key: string; reconnected: boolean } | AuthRejection {
    const { options, identities } = this.deps;
    if (role === 'boss') {
      const created = identities.create('boss', null, meta, ephemeral);
      return { ...created, reconnected: false };
    }
    const profile = checkEmployeeProfile(frame);
    if (!profile.ok) return profile.error;
    if (options.employeeKey !== undefined && !presented(frame.employee_key)) {
      return { code: 'invalid_employee_key', message: 'This relay needs an employee registration key: send it as "employee_key".' };
    }
    if (options.employeeKey !== undefined && !secretMatches(frame.employee_key, options.employeeKey)) {
      return { code: 'invalid_employee_key', message: 'The employee key is not right: send the relay\'s employee registration key as "employee_key".', wrong: 'employee_key' };
    }
    const created = identities.create('employee', profile.value, meta, ephemeral);
    return { ...created, reconnected: false };
  }

  /** New name and/or tags sent with an employee's reconnect; null when none were sent. */
  private profileUpdate(identity: Identity, frame: Record<string, unknown>): { name: string; tags: string[] } | FrameError | null {
    if (identity.role !== 'employee' || (frame.name === undefined && frame.tags === undefined)) return null;
    const merged = checkEmployeeProfile({
      name: frame.name === undefined ? identity.name : frame.name,
      tags: frame.tags === undefined ? identity.tags : frame.tags,
    });
    return merged.ok ? merged.value : merged.error;
  }

  private checkMeta(meta: unknown): Checked<Record<string, unknown> | null> {
    if (meta === undefined || meta === null) return { ok: true, value: null };
    if (!isPlainObject(meta)) return { ok: false, error: { code: 'invalid_frame', message: 'Field "meta" must be a JSON object.' } };
    if (JSON.stringify(meta).length > MAX_META_BYTES) {
      return { ok: false, error: { code: 'invalid_frame', message: `Field "meta" must stay under ${MAX_META_BYTES} bytes of JSON.` } };
    }
    return { ok: true, value: meta };
  }

  private rejectAuth(session: Session, frame: Record<string, unknown>, error: FrameError): void {
    const now = Date.now();
    const claimed = isPlainObject(frame.identity) && typeof frame.identity.id === 'string' ? frame.identity.id : 'unknown';
    const role = frame.role === 'boss' || frame.role === 'employee' ? frame.role : null;
    this.deps.connectionLog.record({
      identityId: claimed.slice(0, 100),
      role,
      event: 'auth_fail',
      reason: error.code,
      timestamp: now,
      online: false,
      address: session.address,
    });
    this.deps.bus.publish({ type: 'auth_fail', code: error.code, role, at: now });
    session.sendError(error.code, error.message);
    const closeCode =
      error.code === 'server_full' ? CLOSE_CODES.serverFull : error.code === 'cluster_unavailable' ? CLOSE_CODES.tryAgainLater : CLOSE_CODES.authRejected;
    session.close(closeCode, error.code);
  }

  disconnect(session: Session, code: number): void {
    const identity = session.identity;
    const wasOnline = this.goOffline(session, code);
    // An ephemeral identity is forgotten with its connection, also one that ended before auth_ok.
    if (identity?.ephemeral && (wasOnline || !this.online.has(identity.id))) this.forget(identity, 'relay', 'ephemeral');
  }

  /** Takes the session out of the online set and records its disconnect; false when it was not the identity's current session. */
  private goOffline(session: Session, code: number): boolean {
    const identity = session.identity;
    this.pausedForLog.delete(session);
    this.draining.delete(session);
    if (this.clustered) this.sharedBacklogs.end(session);
    if (!identity || this.online.get(identity.id) !== session) return false;
    this.online.delete(identity.id);
    if (this.clustered) this.deps.cluster.left(identity.id);
    this.deps.dispatcher.offline(identity.id);
    const now = Date.now();
    identity.lastSeen = now;
    identity.lastDisconnectedAt = now;
    this.deps.identities.save(identity);
    this.deps.connectionLog.record({
      identityId: identity.id,
      role: identity.role,
      event: 'disconnect',
      timestamp: now,
      online: false,
      code,
    });
    // Replaced by a session on another node: the identity is still online there (as on one
    // node, where a replaced session is no disconnect).
    if (code === CLOSE_CODES.replaced && this.clustered) return true;
    this.deps.bus.publish({ type: 'disconnect', node: nodeRef(identity), code, at: now });
    return true;
  }

  // ---- frames after auth ---------------------------------------------------------------------

  handleFrame(session: Session, frame: Record<string, unknown> & { type: string }, arrival: FrameArrival): void {
    const { receivedAt } = arrival;
    const identity = session.identity!;
    identity.lastSeen = receivedAt;
    switch (frame.type) {
      case 'ping':
        identity.lastHeartbeatAt = receivedAt;
        session.send({ type: 'pong', timestamp: Date.now() });
        return;
      case 'health_report':
        this.healthReport(session, identity, frame);
        return;
      case 'message':
        this.route(session, identity, frame, arrival);
        return;
      case 'status':
        this.status(session, identity, frame);
        return;
      case 'task_done':
        this.taskDone(session, identity, frame);
        return;
      case 'auth':
        session.sendError('unsupported_type', 'This connection is already authenticated; auth is only accepted as the first frame.');
        return;
      default:
        session.sendError(
          'unsupported_type',
          `Frame type "${frame.type.slice(0, 40)}" is not supported: use ping, health_report, message, status or task_done.`,
        );
    }
  }

  private healthReport(session: Session, identity: Identity, frame: Record<string, unknown>): void {
    if (typeof frame.valid !== 'boolean') {
      session.sendError('invalid_health_report', 'Field "valid" of health_report must be true or false.');
      return;
    }
    const now = Date.now();
    identity.selfReportValid = frame.valid;
    identity.lastSelfReportAt = now;
    this.deps.identities.save(identity);
    session.send({ type: 'health_report_ack', id: identity.id, valid: frame.valid, timestamp: now });
    this.deps.bus.publish({ type: 'health', node: nodeRef(identity), valid: frame.valid, at: now });
  }

  // ---- dispatch frames (part C) ----------------------------------------------------------------

  private status(session: Session, identity: Identity, frame: Record<string, unknown>): void {
    if (identity.role !== 'employee') {
      session.sendError('invalid_status', 'Only employees send status: a boss is never dispatched tasks.');
      return;
    }
    const checked = checkStatusFrame(frame);
    if (!checked.ok) {
      session.sendError(checked.error.code, checked.error.message);
      return;
    }
    const view = this.deps.dispatcher.setStatus(identity, checked.value.status, checked.value.capacity);
    const now = Date.now();
    const status = view.status === 'offline' ? 'idle' : view.status;
    session.send({ type: 'status_ack', id: identity.id, status, capacity: view.capacity, in_progress: view.in_progress, timestamp: now });
    this.deps.bus.publish({ type: 'availability', node: session.ref ?? nodeRef(identity), status, capacity: view.capacity, in_progress: view.in_progress, at: now });
  }

  private taskDone(session: Session, identity: Identity, frame: Record<string, unknown>): void {
    if (typeof frame.msg_id !== 'string' || frame.msg_id === '' || frame.msg_id.length > MAX_MSG_ID_LENGTH) {
      session.sendError('invalid_msg_id', `task_done needs "msg_id": the msg_id of the task, a string of at most ${MAX_MSG_ID_LENGTH} characters.`);
      return;
    }
    if (frame.failed !== undefined && typeof frame.failed !== 'boolean') {
      session.sendError('invalid_frame', 'Field "failed" of task_done must be true or false.', { msg_id: frame.msg_id });
      return;
    }
    if (!this.deps.dispatcher.taskDone(identity.id, frame.msg_id, frame.failed === true)) {
      session.sendError(
        'task_not_found',
        'No task with this msg_id is in progress with you: it was answered already, or its lease ended and it went to someone else.',
        { msg_id: frame.msg_id },
      );
    }
  }

  /** Writes a frame to an identity's open session; false when it has none. */
  writeTo(id: string, text: string): boolean {
    const session = this.online.get(id);
    if (!session || !session.isOpen) return false;
    session.sendText(text);
    return true;
  }

  // ---- routing -------------------------------------------------------------------------------

  private route(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival): void {
    // Cluster: the dedupe claim is asked at once, so a sender's claims travel pipelined even
    // though its messages are decided one after the other.
    const claim = this.clustered ? this.claimEarly(sender, frame) : undefined;
    if (session.routing === null) {
      // Same turn as claimEarly: a started claim means this node's window holds no such msg_id.
      const waiting = this.routeNow(session, sender, frame, arrival, claim, claim !== undefined);
      if (waiting !== undefined) this.holdOrder(session, waiting);
      return;
    }
    // An earlier message of this sender waits on the cluster store: this one goes after it.
    this.holdOrder(
      session,
      session.routing.then(() => {
        if (session.isOpen) return this.routeNow(session, sender, frame, arrival, claim);
        this.releaseUnused(sender.id, frame.msg_id, claim);
        return undefined;
      }),
    );
  }

  /** Cluster: starts the dedupe claim of a msg_id this node has not seen, or nothing to claim. */
  private claimEarly(sender: Identity, frame: Record<string, unknown>): Promise<DedupeClaim> | undefined {
    const msgId = frame.msg_id;
    const { dedupe, cluster } = this.deps;
    if (!dedupe.enabled || typeof msgId !== 'string' || msgId === '' || msgId.length > MAX_MSG_ID_LENGTH) return undefined;
    if (dedupe.find(sender.id, msgId) !== undefined) return undefined;
    const claim = cluster.claimMsgId(sender.id, msgId);
    claim.catch(() => undefined); // answered where it is awaited
    return claim;
  }

  /** A claim made for a message that was then not routed: give it back. */
  private releaseUnused(senderId: string, msgId: unknown, claim: Promise<DedupeClaim> | undefined): void {
    if (claim === undefined || typeof msgId !== 'string') return;
    claim.then((result) => {
      if (result.kind === 'new') this.deps.cluster.releaseMsgId(senderId, msgId);
    }, () => undefined);
  }

  /** Later messages of the session wait for `step` (cluster only: a single node never waits). */
  private holdOrder(session: Session, step: Promise<void>): void {
    const settled: Promise<void> = step.catch(() => undefined).then(() => {
      if (session.routing === settled) session.routing = null;
    });
    session.routing = settled;
  }

  /** Routes now, or returns a promise when the cluster's dedupe window must be asked first. */
  private routeNow(
    session: Session,
    sender: Identity,
    frame: Record<string, unknown>,
    arrival: FrameArrival,
    claim: Promise<DedupeClaim> | undefined,
    notSeenHere = false,
  ): Promise<void> | undefined {
    const { dedupe } = this.deps;
    let msgId: string;
    if (frame.msg_id === undefined || frame.msg_id === null || frame.msg_id === '') {
      msgId = randomUUID();
    } else if (typeof frame.msg_id === 'string' && frame.msg_id.length <= MAX_MSG_ID_LENGTH) {
      msgId = frame.msg_id;
      const prior = notSeenHere ? undefined : dedupe.find(sender.id, msgId);
      if (prior !== undefined) {
        this.releaseUnused(sender.id, msgId, claim);
        this.answerDuplicate(session, sender, frame, arrival, msgId, prior);
        return undefined;
      }
      if (this.clustered && dedupe.enabled) return this.routeAfterClaim(session, sender, frame, arrival, msgId, claim ?? this.deps.cluster.claimMsgId(sender.id, msgId));
    } else {
      session.sendError('invalid_msg_id', `Field "msg_id" must be a string of at most ${MAX_MSG_ID_LENGTH} characters.`);
      return undefined;
    }
    this.routeChecked(session, sender, frame, arrival, msgId, false);
    return undefined;
  }

  /** Cluster: a msg_id this node has not seen may have been routed by another node. */
  private routeAfterClaim(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival, msgId: string, pending: Promise<DedupeClaim>): Promise<void> {
    return pending.then(
      (claim) => {
        if (!session.isOpen) {
          if (claim.kind === 'new') this.deps.cluster.releaseMsgId(sender.id, msgId);
          return;
        }
        if (claim.kind === 'seen') session.sendText(finishAck(ackPrefix(msgId, claim.outcome), true));
        else this.routeChecked(session, sender, frame, arrival, msgId, true);
      },
      () => session.sendError('cluster_unavailable', CLUSTER_UNAVAILABLE, { msg_id: msgId }),
    );
  }

  private routeChecked(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival, msgId: string, claimed: boolean): void {
    const { options } = this.deps;
    // Only a client's own msg_id can come back; errors from here on name it so the client can
    // tell which send they answer.
    const clientGaveId = frame.msg_id === msgId;
    const target = checkTarget(frame.to);
    if (!target.ok) {
      this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, target.error.code, target.error.message);
      return;
    }
    if (target.value.kind === 'ids' && target.value.ids.length > options.maxTargets) {
      this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'too_many_targets', `A message may name at most ${options.maxTargets} targets; use "tag:<name>" or "*" for more.`);
      return;
    }
    const queueTtlMs = this.queueTtl(frame);
    if (typeof queueTtlMs === 'string') {
      this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'invalid_frame', queueTtlMs);
      return;
    }
    const priority = checkPriority(frame.priority);
    const inReplyTo = checkInReplyTo(frame.in_reply_to, MAX_MSG_ID_LENGTH);
    const taskTimeout = checkTaskTimeout(frame.task_timeout_ms);
    for (const checked of [priority, inReplyTo, taskTimeout]) {
      if (!checked.ok) {
        this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, checked.error.code, checked.error.message);
        return;
      }
    }
    let payloadJson: string | undefined;
    try {
      payloadJson = frame.payload === undefined ? undefined : JSON.stringify(frame.payload);
    } catch {
      this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'invalid_json', 'The payload could not be re-encoded (it nests too deeply); send a flatter JSON value.');
      return;
    }
    if (this.clustered && !this.deps.cluster.available && !this.allHeldHere(target.value)) {
      this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'cluster_unavailable', CLUSTER_UNAVAILABLE);
      return;
    }
    const now = Date.now();
    // Part C fields ride along only when given, so part A/B frames stay exactly as they were.
    const replyField = inReplyTo.ok && inReplyTo.value !== undefined ? `"in_reply_to":${JSON.stringify(inReplyTo.value)},` : '';
    const priorityField = priority.ok && priority.value !== 'normal' ? `"priority":"${priority.value}",` : '';
    const rest = `${replyField}${priorityField}${payloadJson === undefined ? '' : `"payload":${payloadJson},`}"timestamp":${now}}`;
    const head = `{"type":"message","msg_id":${JSON.stringify(msgId)},"from_id":"${sender.id}","from_role":"${sender.role}","to":"`;
    if (target.value.kind === 'any') {
      const submitted = this.deps.dispatcher.submit({
        sender,
        msgId,
        tag: target.value.tag,
        priority: priority.ok ? priority.value : 'normal',
        head,
        rest: `,${rest}`,
        timeoutMs: (taskTimeout.ok ? taskTimeout.value : undefined) ?? options.taskTimeoutMs,
        queueTtlMs,
        now,
      });
      const message: TaskMessage = { msgId, clientGaveId, payloadJson, now, claimed };
      if (!(submitted instanceof Promise)) {
        this.routeTask(session, sender, frame, arrival, message, submitted);
        return;
      }
      // Cluster: the shared store chose (or queued) first.
      submitted.then(
        (dispatch) => this.routeTask(session, sender, frame, arrival, message, dispatch),
        (error: Error) => {
          this.deps.logger.error('cluster_route_failed', { msg_id: msgId, error: error.message });
          this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'cluster_unavailable', CLUSTER_UNAVAILABLE);
        },
      );
      return;
    }
    const context: RouteContext = {
      sender,
      msgId,
      head,
      tail: `",${rest}`,
      split: null,
      queueTtlMs,
      priority: priority.ok ? priority.value : 'normal',
      now,
      delivered: [],
      failed: [],
      queued: [],
      toQueue: [],
      elsewhere: null,
      broadcast: false,
    };
    this.deliverAll(context, target.value);
    if (inReplyTo.ok && inReplyTo.value !== undefined && sender.role === 'employee' && target.value.kind === 'ids') {
      this.deps.dispatcher.replied(sender.id, inReplyTo.value, target.value.ids);
    }
    if (context.elsewhere === null && !context.broadcast) {
      this.finishRoute(session, frame, arrival, context, payloadJson, clientGaveId, claimed);
      return;
    }
    this.deliverElsewhere(context).then(
      () => this.finishRoute(session, frame, arrival, context, payloadJson, clientGaveId, claimed),
      (error: Error) => {
        this.deps.logger.error('cluster_route_failed', { msg_id: msgId, error: error.message });
        // Nothing written here yet: refused, the sender retries (cluster_unavailable is retryable).
        if (context.delivered.length === 0) {
          this.refuseMessage(session, sender.id, msgId, clientGaveId, claimed, 'cluster_unavailable', CLUSTER_UNAVAILABLE);
          return;
        }
        // Targets here have it: a refusal would invite a resend that writes it to them twice.
        this.notDeliveredElsewhere(context);
        this.finishRoute(session, frame, arrival, context, payloadJson, clientGaveId, claimed);
      },
    );
  }

  /** An error for a message that is not routed; a cluster dedupe claim on it is given back. */
  private refuseMessage(session: Session, senderId: string, msgId: string, clientGaveId: boolean, claimed: boolean, code: ProtocolErrorCode, message: string): void {
    if (claimed) this.deps.cluster.releaseMsgId(senderId, msgId);
    session.sendError(code, message, clientGaveId ? { msg_id: msgId } : {});
  }

  /** Whether every target of a message is a socket of this node (what a node without its cluster store can still route). */
  private allHeldHere(target: ParsedTarget): boolean {
    return target.kind === 'ids' && target.ids.every((id) => this.online.has(id));
  }

  /** Cluster: the targets elsewhere whose outcome the route could not learn (the store failed mid-route) were not delivered. */
  private notDeliveredElsewhere(context: RouteContext): void {
    const settled = new Set([...context.delivered, ...context.queued, ...context.failed.map((failure) => failure.id)]);
    for (const id of context.elsewhere ?? []) if (!settled.has(id)) this.notDelivered(context, id, 'target_offline');
  }

  /**
   * Cluster, the store down: copies to queue cannot be stored. Once a target has the message, a
   * store_failed error would invite a resend that writes it to that target again, so the targets
   * to queue fail instead and the ack stays true.
   */
  private failUnstorable(context: RouteContext): void {
    for (const entry of context.toQueue) {
      context.failed.push({ id: entry.target_id, reason: this.online.has(entry.target_id) ? 'target_slow' : 'target_offline' });
    }
    context.queued.length = 0;
    context.toQueue.length = 0;
  }

  /** Logs the routed message, then acks it (once its queued copies are stored). */
  private finishRoute(
    session: Session,
    frame: Record<string, unknown>,
    arrival: FrameArrival,
    context: RouteContext,
    payloadJson: string | undefined,
    clientGaveId: boolean,
    claimed: boolean,
  ): void {
    if (this.clustered && context.toQueue.length > 0 && context.delivered.length > 0 && !this.deps.cluster.available) this.failUnstorable(context);
    const { dedupe } = this.deps;
    const { sender, msgId, now } = context;
    const { receivedAt } = arrival;
    const outcomeText = outcomeFields(context);
    const slot = this.deps.messageLog.append(
      {
        msg_id: msgId,
        timestamp: now,
        from_id: sender.id,
        from_role: sender.role,
        delivered: context.delivered,
        failed: context.failed,
        queued: context.queued,
        payload_json: payloadJson ?? 'null',
      },
      outcomeText,
    );
    if (!this.deps.messageLog.belowHighWaterMark && !this.pausedForLog.has(session)) {
      // The log is behind: stop reading from this sender until it catches up.
      session.ws.pause();
      this.pausedForLog.add(session);
    }
    const prefix = ackPrefix(msgId, outcomeText);
    if (context.toQueue.length === 0) {
      session.sendText(finishAck(prefix, false));
      if (clientGaveId) dedupe.remember(sender.id, msgId, receivedAt, slot);
      if (claimed) this.deps.cluster.settleMsgId(sender.id, msgId, outcomeText);
    } else if (this.clustered) {
      const recordId = this.deps.messageLog.lastRecordId;
      for (const entry of context.toQueue) entry.record_id = recordId;
      const stored = this.storeShared(context.toQueue).then(() => slot);
      if (clientGaveId) dedupe.remember(sender.id, msgId, receivedAt, stored);
      stored.then(
        () => {
          session.sendText(finishAck(prefix, false));
          if (claimed) this.deps.cluster.settleMsgId(sender.id, msgId, outcomeText);
          // Only now wake the targets' nodes: the sender hears the ack before any delivery_update.
          this.deps.cluster.wake(context.toQueue.map((entry) => entry.target_id));
        },
        (error: Error) => {
          this.deps.logger.error('queue_store_failed', { msg_id: msgId, error: error.message });
          // The sender is told to send it again: that resend must be routed, not answered as a duplicate.
          if (clientGaveId) dedupe.forget(sender.id, msgId);
          if (claimed) this.deps.cluster.releaseMsgId(sender.id, msgId);
          session.sendError('store_failed', 'The relay could not store this message for offline targets (see its log); send it again.', { msg_id: msgId });
        },
      );
    } else {
      const recordId = this.deps.messageLog.lastRecordId;
      for (const entry of context.toQueue) entry.record_id = recordId;
      const held = this.deps.queue.enqueue(context.toQueue);
      const stored = this.storeQueued(held).then(() => slot);
      if (clientGaveId) dedupe.remember(sender.id, msgId, receivedAt, stored);
      stored
        .then(
          () => session.sendText(finishAck(prefix, false)),
          (error: Error) => {
            this.deps.logger.error('queue_store_failed', { msg_id: msgId, error: error.message });
            if (clientGaveId) dedupe.forget(sender.id, msgId);
            session.sendError('store_failed', 'The relay could not store this message for offline targets (see its log); send it again.', { msg_id: msgId });
          },
        )
        // Only now may a drain write the entries: the sender hears the ack before any delivery_update.
        .then(() => this.releaseQueued(held.entries));
    }
    this.deps.bus.publish({
      type: 'message',
      msg_id: msgId,
      from: session.ref ?? nodeRef(sender),
      to: frame.to as string | string[],
      delivered: context.delivered,
      failed: context.failed,
      queued: context.queued,
      bytes: arrival.bytes,
      route_ms: performance.now() - arrival.startedAt,
      at: now,
    });
  }

  /** Cluster: the targets this node does not hold, asked of the nodes that do. */
  private deliverElsewhere(context: RouteContext): Promise<void> {
    const { cluster, identities } = this.deps;
    const elsewhere = context.elsewhere ?? [];
    // The usual message: targets the replica knows, no broadcast. One request, no extra awaits.
    if (!context.broadcast && elsewhere.length > 0 && elsewhere.every((id) => identities.get(id) !== undefined)) {
      return cluster.deliverElsewhere(this.piecesOf(context), elsewhere).then((outcomes) => this.settleElsewhere(context, elsewhere, outcomes, []));
    }
    return this.deliverElsewhereLookingUp(context);
  }

  private piecesOf(context: RouteContext): FramePieces {
    return context.queueTtlMs > 0 ? { head: context.head, tail: context.tail, queueable: true } : { head: context.head, tail: context.tail };
  }

  /** The outcomes the holders reported, into the route's lists. */
  private settleElsewhere(context: RouteContext, known: readonly string[], outcomes: Record<string, RemoteOutcome>, reached: readonly string[]): void {
    for (const id of known) {
      const outcome = outcomes[id] ?? 'offline';
      if (outcome === 'delivered') context.delivered.push(id);
      else if (outcome === 'banned') context.failed.push({ id, reason: 'target_banned' });
      else this.notDelivered(context, id, outcome === 'slow' ? 'target_slow' : 'target_offline');
    }
    for (const id of reached) context.delivered.push(id);
  }

  /** Targets the replica does not know are looked up in the store first; a broadcast asks every node. */
  private async deliverElsewhereLookingUp(context: RouteContext): Promise<void> {
    const { cluster, identities } = this.deps;
    const known: string[] = [];
    const unknown: string[] = [];
    for (const id of context.elsewhere ?? []) (identities.get(id) ? known : unknown).push(id);
    // A lookup the store cannot answer now leaves its target offline: never a guess of "not found".
    const fetched = unknown.length === 0 ? [] : await Promise.all(unknown.map((id) => cluster.fetchIdentity(id).catch(() => null)));
    unknown.forEach((id, index) => {
      const found = fetched[index];
      if (found === null) this.notDelivered(context, id, 'target_offline');
      // An ephemeral identity is never in the shared store, but its node is in the presence.
      else if (!found && cluster.locate(id) !== undefined) known.push(id);
      else if (!found) context.failed.push({ id, reason: 'target_not_found' });
      else if (found.banned) context.failed.push({ id, reason: 'target_banned' });
      else known.push(id);
      if (found && !identities.get(id)) identities.apply(toDoc(found));
    });
    const pieces = this.piecesOf(context);
    const [outcomes, reached] = context.broadcast
      ? await Promise.all([known.length > 0 ? cluster.deliverElsewhere(pieces, known) : ({} as Record<string, RemoteOutcome>), cluster.broadcastElsewhere(pieces, context.sender.id)])
      : [known.length > 0 ? await cluster.deliverElsewhere(pieces, known) : ({} as Record<string, RemoteOutcome>), []];
    this.settleElsewhere(context, known, outcomes, reached);
  }

  /**
   * The rest of a message to `any:<tag>` (part C). A task is on disk before its messages.db record
   * and its ack: a record found after a crash always has its task, so a resend answered as a
   * duplicate never loses work. The task goes out to its employee after the ack.
   */
  private routeTask(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival, message: TaskMessage, dispatch: SubmitResult): void {
    const { messageLog, dedupe, logger } = this.deps;
    const { msgId, now } = message;
    const log = (): number => {
      const slot = messageLog.append(
        { msg_id: msgId, timestamp: now, from_id: sender.id, from_role: sender.role, delivered: dispatch.delivered, failed: dispatch.failed, queued: dispatch.queued, payload_json: message.payloadJson ?? 'null' },
        outcomeText,
      );
      if (!messageLog.belowHighWaterMark && !this.pausedForLog.has(session)) {
        session.ws.pause();
        this.pausedForLog.add(session);
      }
      return slot;
    };
    const outcomeText = outcomeFields(dispatch);
    const ack = ackPrefix(msgId, outcomeText);
    const task = dispatch.task;
    if (task === null) {
      const slot = log();
      session.sendText(finishAck(ack, false));
      if (message.clientGaveId) dedupe.remember(sender.id, msgId, arrival.receivedAt, slot);
      if (message.claimed) this.deps.cluster.settleMsgId(sender.id, msgId, outcomeText);
    } else {
      const logged = task.stored.then(() => {
        const slot = log();
        session.sendText(finishAck(ack, false));
        if (message.claimed) this.deps.cluster.settleMsgId(sender.id, msgId, outcomeText);
        task.activate(dispatch.queued.length > 0 ? messageLog.lastRecordId : null);
        return slot;
      });
      if (message.clientGaveId) dedupe.remember(sender.id, msgId, arrival.receivedAt, logged);
      logged.catch((error: Error) => {
        task.abandon();
        if (message.clientGaveId) dedupe.forget(sender.id, msgId);
        if (message.claimed) this.deps.cluster.releaseMsgId(sender.id, msgId);
        logger.error('task_store_failed', { msg_id: msgId, error: error.message });
        session.sendError('store_failed', 'The relay could not store this task (see its log); send it again.', { msg_id: msgId });
      });
    }
    this.deps.bus.publish({
      type: 'message',
      msg_id: msgId,
      from: session.ref ?? nodeRef(sender),
      to: frame.to as string,
      delivered: dispatch.delivered,
      failed: dispatch.failed,
      queued: dispatch.queued,
      bytes: arrival.bytes,
      route_ms: performance.now() - arrival.startedAt,
      at: now,
    });
  }

  /** Answers a repeated msg_id with the first ack, rebuilt from its log record. */
  private answerDuplicate(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival, msgId: string, prior: Remembered): void {
    const { dedupe, messageLog, logger } = this.deps;
    void Promise.resolve(prior)
      .then((slot) => messageLog.ackAt(slot))
      .then((ack) => {
        if (ack) {
          session.sendText(finishAck(ackPrefix(ack.msg_id, outcomeFields(ack)), true));
          return;
        }
        // The first record was pruned already: nothing to repeat, so this is a new message.
        dedupe.forget(sender.id, msgId);
        if (session.isOpen) this.routeChecked(session, sender, frame, arrival, msgId, false);
      })
      .catch((error: Error) => logger.error('duplicate_ack_failed', { msg_id: msgId, error: error.message }));
  }

  /** Queue TTL for this message in ms (0: no queueing), or an error sentence. */
  private queueTtl(frame: Record<string, unknown>): number | string {
    const { queueTtlMs, maxQueueTtlMs } = this.deps.options;
    if (frame.queue !== undefined && typeof frame.queue !== 'boolean') return 'Field "queue" must be true or false.';
    if (frame.ttl_ms !== undefined && (typeof frame.ttl_ms !== 'number' || !Number.isFinite(frame.ttl_ms) || frame.ttl_ms <= 0)) {
      return 'Field "ttl_ms" must be a positive number of milliseconds.';
    }
    const wants = frame.queue === true || (frame.queue !== false && queueTtlMs > 0);
    if (!wants) return 0;
    const asked = typeof frame.ttl_ms === 'number' ? frame.ttl_ms : queueTtlMs > 0 ? queueTtlMs : maxQueueTtlMs;
    return Math.min(Math.round(asked), maxQueueTtlMs);
  }

  private deliverAll(context: RouteContext, target: ParsedTarget): void {
    const senderId = context.sender.id;
    if (target.kind === 'broadcast') {
      // Broadcast reaches who is online now; offline identities are not failures.
      for (const session of this.online.values()) {
        const identity = session.identity!;
        if (identity.id !== senderId) this.deliverTo(context, identity.id, identity, session);
      }
      context.broadcast = this.clustered;
    } else if (target.kind === 'tag') {
      for (const id of this.deps.identities.withTag(target.tag)) if (id !== senderId) this.deliverOne(context, id);
    } else if (target.kind === 'ids') {
      for (const id of target.ids) this.deliverOne(context, id);
    }
  }

  private deliverOne(context: RouteContext, targetId: string): void {
    const identity = this.deps.identities.get(targetId);
    if (!identity) {
      if (this.clustered) (context.elsewhere ??= []).push(targetId);
      else context.failed.push({ id: targetId, reason: 'target_not_found' });
      return;
    }
    this.deliverTo(context, targetId, identity, this.online.get(targetId));
  }

  /** One target, its identity and session already looked up (a broadcast walks the sessions). */
  private deliverTo(context: RouteContext, targetId: string, identity: Identity, session: Session | undefined): void {
    if (identity.banned) {
      context.failed.push({ id: targetId, reason: 'target_banned' });
      return;
    }
    if (session === undefined && this.clustered) {
      (context.elsewhere ??= []).push(targetId);
      return;
    }
    // A socket that is closing (peer leaving, relay shutting down) drops what is written to it:
    // treat its target as offline, so the message is queued or failed instead of lost as delivered.
    const open = session !== undefined && session.isOpen;
    // A message that may be queued goes behind the target's backlog while that drains, so
    // queued messages arrive in send order; one that may not is written at once as before.
    // (A cluster's backlog is in the cluster store, known here while this node drains it.)
    const behindBacklog =
      open && context.queueTtlMs > 0 && (this.clustered ? this.sharedBacklogs.has(session) : this.deps.queue.pendingFor(targetId).length > 0);
    if (behindBacklog && this.clustered) this.sharedBacklogs.sentBehind(session, context.now);
    if (open && !behindBacklog) {
      if (session.ws.bufferedAmount <= this.deps.options.maxBufferedBytes) {
        session.sendSplit((context.split ??= splitText(context.head, context.tail)), targetId);
        context.delivered.push(targetId);
        return;
      }
      if (session.slowSince === null) session.slowSince = context.now;
    }
    this.notDelivered(context, targetId, open ? 'target_slow' : 'target_offline');
  }

  /** A target not written to: queued when queueing applies, else failed with `reason`. */
  private notDelivered(context: RouteContext, targetId: string, reason: 'target_slow' | 'target_offline'): void {
    if (context.queueTtlMs > 0) {
      context.queued.push(targetId);
      context.toQueue.push({
        target_id: targetId,
        from_id: context.sender.id,
        msg_id: context.msgId,
        record_id: '',
        frame: context.head + targetId + context.tail,
        queued_at: context.now,
        expires_at: context.now + context.queueTtlMs,
        ...(context.priority !== 'normal' && { priority: context.priority }),
      });
      return;
    }
    context.failed.push({ id: targetId, reason });
  }

  // ---- store-and-forward ---------------------------------------------------------------------

  /** Cluster: queued copies go to the cluster store, for whichever node the target reaches. */
  private async storeShared(entries: NewQueuedEntry[]): Promise<void> {
    await Promise.all([this.deps.cluster.enqueue(entries), this.deps.messageLog.flush()]);
  }

  private async storeQueued(held: HeldEntries): Promise<void> {
    const { queue, messageLog, options } = this.deps;
    await Promise.all([held.stored, messageLog.flush()]);
    const targets = new Set(held.entries.map((entry) => entry.target_id));
    for (const targetId of targets) {
      const dropped = queue.overflow(targetId, options.maxQueuedPerTarget);
      if (dropped.length > 0) void this.finishQueued(dropped, 'expired');
    }
  }

  /** Hands stored entries to their targets' drains; a target that is online gets them now. */
  private releaseQueued(entries: readonly QueuedEntry[]): void {
    this.deps.queue.release(entries);
    let last: string | undefined;
    for (const entry of entries) {
      if (entry.target_id === last) continue;
      last = entry.target_id;
      const session = this.online.get(entry.target_id);
      if (session?.isOpen) this.deliverQueued(session);
    }
  }

  /**
   * Writes a target's queued messages in send order, in batches of at most DRAIN_BATCH_ENTRIES
   * while its socket holds under half of --max-buffered (the other half stays free for live
   * messages to it). A batch counts as delivered once the socket has handed it to the kernel;
   * the next one waits until this one's removal is on disk and the socket has room again (its
   * 'drain'). So the drain resumes on its own past the buffer bound, a crash delivers at most
   * one batch twice, and a frame still in the relay's buffer when the connection drops stays
   * queued for the next auth.
   */
  deliverQueued(session: Session): void {
    if (this.draining.has(session)) return;
    const identity = session.identity;
    if (!identity || !session.isOpen || this.online.get(identity.id) !== session) return;
    const { queue, options } = this.deps;
    const room = options.maxBufferedBytes / 2;
    const resume = () => {
      if (this.draining.delete(session)) this.deliverQueued(session);
    };
    const sent: QueuedEntry[] = [];
    const flushed: QueuedEntry[] = [];
    let settled = 0;
    let writing = true;
    const finish = () => {
      void this.finishQueued(flushed, 'delivered').then(() => session.whenWritable(room, resume));
    };
    let full = false;
    for (const entry of queue.pendingFor(identity.id)) {
      // An entry whose sender has no ack yet is handed on by releaseQueued, which calls back here.
      if (sent.length === DRAIN_BATCH_ENTRIES || !queue.isReleased(entry)) break;
      if (session.ws.bufferedAmount > room) {
        full = true;
        break;
      }
      sent.push(entry);
      session.sendQueued(entry.frame, (error) => {
        // Socket writes complete in order, so `flushed` stays in send order.
        if (!error) flushed.push(entry);
        if (++settled === sent.length && !writing) finish();
      });
    }
    writing = false;
    if (sent.length === 0 && !full) return;
    this.draining.add(session);
    if (sent.length === 0) session.whenWritable(room, resume);
    else if (settled === sent.length) finish();
  }

  /** Settles entries still queued and tells their senders; resolves once their removal is on disk. */
  private finishQueued(entries: readonly QueuedEntry[], status: 'delivered' | 'expired'): Promise<void> {
    if (entries.length === 0) return Promise.resolve();
    const { queue, messageLog, bus } = this.deps;
    const { removed, written } = queue.remove(entries);
    const now = Date.now();
    for (const entry of removed) {
      messageLog.updateTarget(entry.record_id, entry.target_id, status);
      this.online.get(entry.from_id)?.send({ type: 'delivery_update', msg_id: entry.msg_id, id: entry.target_id, status, timestamp: now });
      bus.publish({ type: 'delivery_update', msg_id: entry.msg_id, from_id: entry.from_id, id: entry.target_id, status, at: now });
    }
    return written;
  }

  expireQueued(now: number): void {
    void this.finishQueued(this.deps.queue.expired(now), 'expired');
  }

  // ---- identity lifecycle --------------------------------------------------------------------

  /**
   * Removes an identity: an online one is told (system frame "identity_deleted") and closed with
   * 4010 first. Messages queued for it are dropped (their senders hear delivery_update "expired");
   * `written` resolves once the identity and the queue removals are on disk.
   */
  async deleteIdentity(id: string, by: string): Promise<DeleteResult> {
    const identity = this.deps.identities.get(id);
    // An ephemeral identity lives on its node only, like a single node's.
    if (this.clustered && identity?.ephemeral !== true) return this.deleteShared(id, by);
    if (!identity) return notFound(id);
    const session = this.online.get(id);
    if (session) this.closeDeleted(session, by);
    const { dropped, written } = this.forget(identity, by, 'deleted');
    return { ok: true, identity, wasOnline: session !== undefined, droppedQueued: dropped, written };
  }

  /** Offline first, so its disconnect is recorded before the removal, not after. */
  private closeDeleted(session: Session, by: string): void {
    session.send({ type: 'system', event: 'identity_deleted', by, timestamp: Date.now() });
    this.goOffline(session, CLOSE_CODES.identityDeleted);
    session.close(CLOSE_CODES.identityDeleted, 'Identity deleted by an admin');
  }

  /**
   * Cluster: out of the shared store first (with its queued copies, reported expired to their
   * senders), then here; the node holding the session closes it when it hears the announcement.
   */
  private async deleteShared(id: string, by: string): Promise<DeleteResult> {
    const identity = await this.sharedIdentity(id);
    if (identity === null) return clusterUnavailable();
    if (!identity) return notFound(id);
    let removal: Awaited<ReturnType<ClusterLink['removeIdentity']>>;
    try {
      removal = await this.deps.cluster.removeIdentity(id, by, false);
    } catch {
      return clusterUnavailable();
    }
    if (removal === null) return notFound(id);
    const session = this.online.get(id);
    if (session) this.closeDeleted(session, by);
    for (const entry of removal.dropped) this.deps.cluster.finishQueued(queuedOutcomeOf(entry, 'expired'));
    const { dropped, written } = this.forget(identity, by, 'deleted', removal.dropped.length);
    return { ok: true, identity, wasOnline: session !== undefined || removal.holder !== null, droppedQueued: dropped, written };
  }

  /** Cluster: the identity from this node's replica, else from the shared store; null while the shared store cannot be reached. */
  private async sharedIdentity(id: string): Promise<Identity | undefined | null> {
    const { identities, cluster } = this.deps;
    // Nothing is changed here that could not also be changed in the shared store.
    if (!cluster.available) return null;
    const known = identities.get(id);
    if (known) return known;
    const found = await cluster.fetchIdentity(id).catch(() => null);
    if (!found) return found;
    return identities.apply(toDoc(found)) ?? undefined;
  }

  /**
   * Gives an identity a new key, answered once: the old key is refused from now on, and an online
   * session is told (system frame "key_rotated") and closed with 4009, so only a holder of the new
   * key can come back. `written` resolves once the new key's hash is on disk.
   */
  async rotateKey(id: string, by: string): Promise<RotateResult> {
    const identity = this.clustered ? await this.sharedIdentity(id) : this.deps.identities.get(id);
    if (identity === null) return clusterUnavailable();
    if (!identity) return notFound(id);
    const key = this.deps.identities.rotateKey(identity);
    const written = this.deps.identities.flush();
    let holder: string | null = null;
    if (this.clustered) {
      // The new hash reaches every replica before the announcement that closes the session.
      await written;
      try {
        holder = await this.deps.cluster.keyRotated(id, by);
      } catch {
        return clusterUnavailable();
      }
    }
    const session = this.online.get(id);
    const online = session !== undefined || holder !== null;
    const now = Date.now();
    this.deps.connectionLog.record({ identityId: id, role: identity.role, event: 'rotate_key', timestamp: now, online, reason: by });
    this.deps.bus.publish({ type: 'key_rotated', node: nodeRef(identity), by, at: now });
    if (session) this.closeRotated(session, by);
    return { ok: true, identity, key, wasOnline: online, written };
  }

  private closeRotated(session: Session, by: string): void {
    session.send({ type: 'system', event: 'key_rotated', by, timestamp: Date.now() });
    session.close(CLOSE_CODES.credentialsChanged, 'Identity key rotated by an admin');
  }

  /**
   * Removes identities offline and not seen for `maxAgeMs`; resolves to how many, once on disk.
   * In a cluster an identity online on any node is kept (checked in the shared store, at the
   * removal), and of several nodes pruning the same identity one removes it.
   */
  async forgetOffline(maxAgeMs: number, now = Date.now()): Promise<number> {
    const stale = this.deps.identities.offlineSince(now - maxAgeMs, (id) => this.isOnline(id));
    if (stale.length === 0) return 0;
    let dropped = 0;
    let count = 0;
    const writes: Promise<void>[] = [];
    const by = 'forget-offline-after';
    const removals = this.clustered ? await Promise.all(stale.map((identity) => this.deps.cluster.removeIdentity(identity.id, by, true))) : null;
    for (const [index, identity] of stale.entries()) {
      const shared = removals?.[index];
      if (shared === null) continue;
      for (const entry of shared?.dropped ?? []) this.deps.cluster.finishQueued(queuedOutcomeOf(entry, 'expired'));
      const removal = this.forget(identity, by, 'forgotten', shared?.dropped.length ?? 0);
      dropped += removal.dropped;
      count++;
      writes.push(removal.written);
    }
    await Promise.all(writes);
    if (count > 0) this.deps.logger.info('identities_forgotten', { count, dropped_queued: dropped, offline_for_ms: maxAgeMs });
    return count;
  }

  /**
   * Drops an identity and the messages queued for it; a second call for the same one does nothing.
   * `droppedElsewhere`: its copies the cluster store dropped (reported by the caller).
   */
  private forget(identity: Identity, by: string, reason: RemovalReason, droppedElsewhere = 0): { dropped: number; written: Promise<void> } {
    const { identities, queue, connectionLog, bus } = this.deps;
    if (identities.get(identity.id) !== identity) return { dropped: 0, written: Promise.resolve() };
    const pending = [...queue.pendingFor(identity.id)];
    const queueWritten = this.finishQueued(pending, 'expired');
    const removed = identities.remove(identity);
    const now = Date.now();
    const dropped = pending.length + droppedElsewhere;
    // An ephemeral identity's disconnect is logged already; one line per `send` is enough.
    if (reason !== 'ephemeral') {
      connectionLog.record({ identityId: identity.id, role: identity.role, event: 'delete', timestamp: now, online: false, reason: `${reason} by ${by}` });
    }
    bus.publish({ type: 'identity_removed', node: nodeRef(identity), by, reason, dropped, at: now });
    return { dropped, written: Promise.all([queueWritten, removed]).then(() => undefined) };
  }

  /** Closes the sessions of bosses that authenticated with a credential that was revoked or changed. */
  private closeRevokedBosses(names: ReadonlySet<string>): void {
    const now = Date.now();
    for (const session of this.online.values()) {
      const identity = session.identity!;
      if (identity.role !== 'boss' || identity.credential === null || !names.has(identity.credential)) continue;
      session.send({ type: 'system', event: 'credentials_revoked', by: 'boss-keys-file', timestamp: now });
      session.close(CLOSE_CODES.credentialsChanged, 'Boss key revoked');
    }
  }

  // ---- bans ----------------------------------------------------------------------------------

  async setBan(id: string, banned: boolean, by: string): Promise<BanResult> {
    const { identities, cluster } = this.deps;
    let identity = identities.get(id);
    if (!identity && this.clustered) {
      const found = await cluster.fetchIdentity(id).catch(() => null);
      if (found === null) return { ok: false, status: 503, code: 'cluster_unavailable', message: CLUSTER_UNAVAILABLE };
      if (found) identity = identities.apply(toDoc(found)) ?? undefined;
    }
    if (!identity) {
      return { ok: false, status: 404, code: 'not_found', message: `No employee has id "${id}"; list them with GET /employees.` };
    }
    if (identity.role !== 'employee') {
      return { ok: false, status: 409, code: 'not_an_employee', message: `"${id}" is a boss; only employees can be banned.` };
    }
    if (this.clustered) {
      // In the cluster store first (another node may hold the socket; its replica learns from the announcement).
      try {
        await cluster.setBanned(identity, banned, by);
      } catch {
        return { ok: false, status: 503, code: 'cluster_unavailable', message: CLUSTER_UNAVAILABLE };
      }
    }
    const now = Date.now();
    const session = this.online.get(id);
    if (identity.banned !== banned) {
      identity.banned = banned;
      if (!this.clustered) identities.save(identity);
      this.deps.connectionLog.record({ identityId: id, role: 'employee', event: banned ? 'ban' : 'unban', timestamp: now, online: session !== undefined, reason: by });
      this.deps.bus.publish({ type: banned ? 'ban' : 'unban', node: nodeRef(identity), by, at: now });
    }
    if (banned && session) this.closeBanned(session, by);
    return { ok: true, identity, online: banned ? false : session !== undefined };
  }

  private closeBanned(session: Session, by: string): void {
    session.send({ type: 'system', event: 'banned', by, timestamp: Date.now() });
    session.close(CLOSE_CODES.banned, 'Banned by an admin');
  }

  // ---- what other nodes ask of this one (ClusterHandlers) -------------------------------------

  deliverHere(pieces: FramePieces, ids: readonly string[]): Record<string, RemoteOutcome> {
    const outcomes: Record<string, RemoteOutcome> = {};
    let split: SplitText | null = null;
    for (const id of ids) {
      const session = this.online.get(id);
      if (session === undefined || !session.isOpen) outcomes[id] = 'offline';
      else if (session.identity!.banned) outcomes[id] = 'banned';
      else if (pieces.queueable === true && this.sharedBacklogs.has(session)) {
        // The asking node queues it: behind the copies this node is writing.
        this.sharedBacklogs.sentBehind(session, Date.now());
        outcomes[id] = 'backlog';
      } else if (session.ws.bufferedAmount > this.deps.options.maxBufferedBytes) outcomes[id] = 'slow';
      else {
        session.sendSplit((split ??= splitText(pieces.head, pieces.tail)), id);
        outcomes[id] = 'delivered';
      }
    }
    return outcomes;
  }

  broadcastHere(pieces: FramePieces, senderId: string): string[] {
    const reached: string[] = [];
    let split: SplitText | null = null;
    for (const [id, session] of this.online) {
      if (id === senderId || !session.isOpen || session.identity!.banned) continue;
      if (session.ws.bufferedAmount > this.deps.options.maxBufferedBytes) continue;
      session.sendSplit((split ??= splitText(pieces.head, pieces.tail)), id);
      reached.push(id);
    }
    return reached;
  }

  heldIds(): Iterable<string> {
    return this.online.keys();
  }

  private seenSharedAt = 0;

  recentlySeen(): [string, number, number | null][] {
    const since = this.seenSharedAt;
    this.seenSharedAt = Date.now();
    const seen: [string, number, number | null][] = [];
    for (const session of this.online.values()) {
      const identity = session.identity!;
      const lastSeen = Math.max(identity.lastSeen, session.lastActivityAt);
      if (lastSeen > since) seen.push([identity.id, lastSeen, identity.lastHeartbeatAt]);
    }
    return seen;
  }

  seenElsewhere(seen: readonly [string, number, number | null][]): void {
    for (const [id, lastSeen, lastHeartbeatAt] of seen) {
      const identity = this.deps.identities.get(id);
      if (!identity || this.online.has(id)) continue;
      if (lastSeen > identity.lastSeen) identity.lastSeen = lastSeen;
      if (lastHeartbeatAt !== null && lastHeartbeatAt > (identity.lastHeartbeatAt ?? 0)) identity.lastHeartbeatAt = lastHeartbeatAt;
    }
  }

  replacedElsewhere(id: string): void {
    this.online.get(id)?.close(CLOSE_CODES.replaced, 'Replaced by a newer session of this identity');
  }

  identityWritten(doc: Record<string, unknown>): void {
    const id = typeof doc._id === 'string' ? doc._id : null;
    if (id === null) return;
    // A ban travels on its own announcement: keep what this replica knows.
    const banned = this.deps.identities.get(id)?.banned ?? false;
    const identity = this.deps.identities.apply(doc);
    if (identity) identity.banned = banned;
  }

  banChanged(id: string, banned: boolean, by: string): void {
    const identity = this.deps.identities.get(id);
    if (identity) identity.banned = banned;
    const session = this.online.get(id);
    if (banned && session) this.closeBanned(session, by);
  }

  identityRemoved(id: string, by: string): void {
    const session = this.online.get(id);
    if (session) this.closeDeleted(session, by);
    const identity = this.deps.identities.get(id);
    // The removing node logged and announced the removal; the replica forgets it quietly.
    if (identity) void this.deps.identities.remove(identity);
  }

  keyRotatedElsewhere(id: string, by: string): void {
    const session = this.online.get(id);
    if (session) this.closeRotated(session, by);
  }

  queuedFor(id: string): void {
    const session = this.online.get(id);
    if (session === undefined) return;
    this.sharedBacklogs.announced(session);
    if (session.isOpen) this.drainShared(session);
  }

  queuedOutcome(outcome: QueuedOutcome): void {
    const now = Date.now();
    const { msg_id, from_id, target_id, status } = outcome;
    if (outcome.origin === this.nodeId) {
      this.deps.messageLog.updateTarget(outcome.record_id, target_id, status);
      this.deps.bus.publish({ type: 'delivery_update', msg_id, from_id, id: target_id, status, at: now });
    }
    this.online.get(from_id)?.send({ type: 'delivery_update', msg_id, id: target_id, status, timestamp: now });
  }

  /**
   * Cluster: writes the queued copies waiting in the cluster store for this session's identity,
   * in order, while its socket holds under half of --max-buffered (as the local drain does). A
   * copy counts as delivered once the socket has handed it to the kernel; the first copy that
   * was not (the socket closed) and every later one go back to the head of the queue for the
   * next auth. One drain per session at a time, so a wake during a drain cannot reorder.
   */
  private drainShared(session: Session): void {
    const id = session.identity!.id;
    if (this.drainingShared.has(session)) {
      this.drainingShared.set(session, true);
      return;
    }
    this.drainingShared.set(session, false);
    this.sharedBacklogs.begin(session);
    const { cluster, logger, options } = this.deps;
    const room = options.maxBufferedBytes / 2;
    const holds = () => session.isOpen && this.online.get(id) === session;
    let moreLater = false;
    let took = false;
    let failed = false;
    const drain = async () => {
      const entries = await cluster.takeQueued(id);
      if (entries.length === 0) return;
      took = true;
      const now = Date.now();
      const written: SharedQueuedEntry[] = [];
      const writes: Promise<boolean>[] = [];
      const rest: SharedQueuedEntry[] = [];
      for (const entry of entries) {
        if (entry.expires_at <= now) cluster.finishQueued(queuedOutcomeOf(entry, 'expired'));
        else if (rest.length > 0 || !holds() || session.ws.bufferedAmount > room) rest.push(entry);
        else {
          written.push(entry);
          writes.push(new Promise((resolve) => session.sendQueued(entry.frame, (error) => resolve(!error))));
        }
      }
      const results = await Promise.all(writes);
      // Socket writes complete in order: everything from the first unwritten copy on goes back.
      const firstLost = results.indexOf(false);
      const delivered = firstLost < 0 ? written : written.slice(0, firstLost);
      for (const entry of delivered) cluster.finishQueued(queuedOutcomeOf(entry, 'delivered'));
      const back = firstLost < 0 ? rest : [...written.slice(firstLost), ...rest];
      if (back.length > 0) await cluster.returnQueued(id, back);
      moreLater = firstLost < 0 && rest.length > 0;
    };
    drain()
      .catch((error: Error) => {
        failed = true;
        logger.warn('queue_drain_failed', { id, error: error.message });
      })
      .finally(() => {
        const again = this.drainingShared.get(session) === true;
        this.drainingShared.delete(session);
        if (!holds() || failed) this.sharedBacklogs.end(session);
        if (!holds()) return;
        if (moreLater) session.whenWritable(room, () => this.drainShared(session));
        // After a drain that wrote copies, one more finds whether others came meanwhile.
        else if (again || took) this.drainShared(session);
        else if (!failed) this.sharedBacklogs.drained(session, Date.now());
      });
  }
}

function queuedOutcomeOf(entry: SharedQueuedEntry, status: 'delivered' | 'expired'): QueuedOutcome {
  return { origin: entry.origin, record_id: entry.record_id, msg_id: entry.msg_id, from_id: entry.from_id, target_id: entry.target_id, status };
}

function clusterUnavailable(): AdminFailure {
  return { ok: false, status: 503, code: 'cluster_unavailable', message: CLUSTER_UNAVAILABLE };
}

function notFound(id: string): AdminFailure {
  return { ok: false, status: 404, code: 'not_found', message: `No identity has id "${id.slice(0, 100)}"; list them with GET /api/connections.` };
}

function serverFullMessage(maxConnections: number): string {
  return `The relay is at its limit of ${maxConnections} connections; try again later.`;
}
