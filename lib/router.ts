// Routing between authenticated identities: auth decisions, presence, message delivery with
// its ack, store-and-forward for offline targets, idempotent resend and bans. The gateway
// (ws-gateway.ts) hands it validated-JSON frames; everything here trusts lib/protocol's types.

import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import { presented, type GuessTarget } from './auth-throttle';
import { AUTHKEY_CREDENTIAL, type BossKeys } from './boss-keys';
import type { ConnectionLog } from './connection-log';
import type { DedupeCache, Remembered } from './dedupe-cache';
import { ackPrefix, finishAck, outcomeFields } from './delivery-ack';
import type { DeliveryQueue, HeldEntries, NewQueuedEntry, QueuedEntry } from './delivery-queue';
import type { EventBus, NodeRef } from './events';
import type { Identity, IdentityStore } from './identity-store';
import type { Logger } from './logger';
import type { MessageLog } from './message-log';
import type { ResolvedOptions } from './options';
import {
  CLOSE_CODES,
  checkEmployeeProfile,
  checkIdentity,
  checkRole,
  checkTarget,
  isPlainObject,
  type Checked,
  type DeliveryFailure,
  type FrameError,
  type ParsedTarget,
  type Role,
} from './protocol';
import type { Session } from './session';
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
  bus: EventBus;
  logger: Logger;
  /** Named boss credentials (--boss-keys-file), accepted beside the authkey. */
  bossKeys?: BossKeys | null;
}

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

export type AdminFailure = { ok: false; status: 404; code: string; message: string };

export type DeleteResult = { ok: true; identity: Identity; wasOnline: boolean; droppedQueued: number; written: Promise<void> } | AdminFailure;

export type RotateResult = { ok: true; identity: Identity; key: string; wasOnline: boolean; written: Promise<void> } | AdminFailure;

export type BanResult =
  | { ok: true; identity: Identity; online: boolean }
  | { ok: false; status: 404 | 409; code: string; message: string };

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

interface RouteContext {
  sender: Identity;
  msgId: string;
  head: string;
  tail: string;
  /** head and tail encoded, made at the first delivery. */
  split: SplitText | null;
  queueTtlMs: number;
  now: number;
  delivered: string[];
  failed: DeliveryFailure[];
  queued: string[];
  toQueue: NewQueuedEntry[];
}

export class Router {
  /** Authenticated sessions by identity id. */
  readonly online = new Map<string, Session>();
  private readonly pausedForLog = new Set<Session>();
  /** Sessions whose queued backlog is being written, waiting for a removal batch or for socket room. */
  private readonly draining = new Set<Session>();

  constructor(private readonly deps: RouterDeps) {
    deps.messageLog.onDrain(() => {
      for (const session of this.pausedForLog) session.ws.resume();
      this.pausedForLog.clear();
    });
    deps.bossKeys?.onRevoked((names) => this.closeRevokedBosses(names));
  }

  get options(): ResolvedOptions {
    return this.deps.options;
  }

  countOnline(): { boss: number; employee: number } {
    const counts = { boss: 0, employee: 0 };
    for (const session of this.online.values()) counts[session.identity!.role]++;
    return counts;
  }

  isOnline(id: string): boolean {
    return this.online.has(id);
  }

  // ---- auth ----------------------------------------------------------------------------------

  /**
   * Authenticates the session or rejects the auth (error frame, close 4003). Returns the secret
   * a rejected auth got wrong, for the gateway's throttle; null when it succeeded or failed for
   * any other reason (a missing secret, a malformed or invalid frame).
   */
  authenticate(session: Session, frame: Record<string, unknown>): GuessTarget | null {
    const outcome = this.decideAuth(frame);
    if ('code' in outcome) {
      this.rejectAuth(session, frame, outcome);
      return outcome.wrong ?? null;
    }
    const { identity, key, reconnected, credential } = outcome;
    session.identity = identity;
    if (credential !== null && identity.credential !== credential) {
      identity.credential = credential;
      this.deps.identities.save(identity);
    }
    if (reconnected) {
      this.goOnline(session, identity, key, true);
      return null;
    }
    // A new identity is on disk before its key is handed out, so a crash cannot forget an
    // identity its client was already told about.
    void this.deps.identities.flush().then(() => {
      // An admin may have deleted it meanwhile (it is listed from creation on).
      if (session.isOpen && this.deps.identities.get(identity.id) === identity) this.goOnline(session, identity, key, false);
    });
    return null;
  }

  private goOnline(session: Session, identity: Identity, key: string, reconnected: boolean): void {
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
      node: session.ref,
      reconnected,
      at: now,
      ...(identity.role === 'boss' && identity.credential !== null && { credential: identity.credential }),
    });
    this.deliverQueued(session);
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
    const replacing = credentials.value !== undefined && this.online.has(credentials.value.id);
    if (!replacing && this.online.size >= options.maxConnections) {
      return { code: 'server_full', message: `The relay is at its limit of ${options.maxConnections} connections; try again later.` };
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
    session.close(error.code === 'server_full' ? CLOSE_CODES.serverFull : CLOSE_CODES.authRejected, error.code);
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
    if (!identity || this.online.get(identity.id) !== session) return false;
    this.online.delete(identity.id);
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
      case 'auth':
        session.sendError('unsupported_type', 'This connection is already authenticated; auth is only accepted as the first frame.');
        return;
      default:
        session.sendError(
          'unsupported_type',
          `Frame type "${frame.type.slice(0, 40)}" is not supported: use ping, health_report or message.`,
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

  // ---- routing -------------------------------------------------------------------------------

  private route(session: Session, sender: Identity, frame: Record<string, unknown>, arrival: FrameArrival): void {
    const { receivedAt } = arrival;
    const { options, dedupe } = this.deps;
    let msgId: string;
    if (frame.msg_id === undefined || frame.msg_id === null || frame.msg_id === '') {
      msgId = randomUUID();
    } else if (typeof frame.msg_id === 'string' && frame.msg_id.length <= MAX_MSG_ID_LENGTH) {
      msgId = frame.msg_id;
      const prior = dedupe.find(sender.id, msgId);
      if (prior !== undefined) {
        this.answerDuplicate(session, sender, frame, arrival, msgId, prior);
        return;
      }
    } else {
      session.sendError('invalid_msg_id', `Field "msg_id" must be a string of at most ${MAX_MSG_ID_LENGTH} characters.`);
      return;
    }
    // Only a client's own msg_id can come back; errors from here on name it so the client can
    // tell which send they answer.
    const clientGaveId = frame.msg_id === msgId;
    const answering = clientGaveId ? { msg_id: msgId } : {};
    const target = checkTarget(frame.to);
    if (!target.ok) {
      session.sendError(target.error.code, target.error.message, answering);
      return;
    }
    if (target.value.kind === 'ids' && target.value.ids.length > options.maxTargets) {
      session.sendError('too_many_targets', `A message may name at most ${options.maxTargets} targets; use "tag:<name>" or "*" for more.`, answering);
      return;
    }
    const queueTtlMs = this.queueTtl(frame);
    if (typeof queueTtlMs === 'string') {
      session.sendError('invalid_frame', queueTtlMs, answering);
      return;
    }
    let payloadJson: string | undefined;
    try {
      payloadJson = frame.payload === undefined ? undefined : JSON.stringify(frame.payload);
    } catch {
      session.sendError('invalid_json', 'The payload could not be re-encoded (it nests too deeply); send a flatter JSON value.', answering);
      return;
    }
    const now = Date.now();
    const context: RouteContext = {
      sender,
      msgId,
      head: `{"type":"message","msg_id":${JSON.stringify(msgId)},"from_id":"${sender.id}","from_role":"${sender.role}","to":"`,
      tail: `",${payloadJson === undefined ? '' : `"payload":${payloadJson},`}"timestamp":${now}}`,
      split: null,
      queueTtlMs,
      now,
      delivered: [],
      failed: [],
      queued: [],
      toQueue: [],
    };
    this.deliverAll(context, target.value);
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
        if (session.isOpen) this.route(session, sender, frame, arrival);
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
    } else if (target.kind === 'tag') {
      for (const id of this.deps.identities.withTag(target.tag)) if (id !== senderId) this.deliverOne(context, id);
    } else {
      for (const id of target.ids) this.deliverOne(context, id);
    }
  }

  private deliverOne(context: RouteContext, targetId: string): void {
    const identity = this.deps.identities.get(targetId);
    if (!identity) {
      context.failed.push({ id: targetId, reason: 'target_not_found' });
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
    // A socket that is closing (peer leaving, relay shutting down) drops what is written to it:
    // treat its target as offline, so the message is queued or failed instead of lost as delivered.
    const open = session !== undefined && session.isOpen;
    // A message that may be queued goes behind the target's backlog while that drains, so
    // queued messages arrive in send order; one that may not is written at once as before.
    const behindBacklog = open && context.queueTtlMs > 0 && this.deps.queue.pendingFor(targetId).length > 0;
    if (open && !behindBacklog) {
      if (session.ws.bufferedAmount <= this.deps.options.maxBufferedBytes) {
        session.sendSplit((context.split ??= splitText(context.head, context.tail)), targetId);
        context.delivered.push(targetId);
        return;
      }
      if (session.slowSince === null) session.slowSince = context.now;
    }
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
      });
      return;
    }
    const reason = open ? 'target_slow' : 'target_offline';
    context.failed.push({ id: targetId, reason });
  }

  // ---- store-and-forward ---------------------------------------------------------------------

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
  deleteIdentity(id: string, by: string): DeleteResult {
    const identity = this.deps.identities.get(id);
    if (!identity) return notFound(id);
    const session = this.online.get(id);
    if (session) {
      // Offline first, so its disconnect is recorded before the removal, not after.
      session.send({ type: 'system', event: 'identity_deleted', by, timestamp: Date.now() });
      this.goOffline(session, CLOSE_CODES.identityDeleted);
      session.close(CLOSE_CODES.identityDeleted, 'Identity deleted by an admin');
    }
    const { dropped, written } = this.forget(identity, by, 'deleted');
    return { ok: true, identity, wasOnline: session !== undefined, droppedQueued: dropped, written };
  }

  /**
   * Gives an identity a new key, answered once: the old key is refused from now on, and an online
   * session is told (system frame "key_rotated") and closed with 4009, so only a holder of the new
   * key can come back. `written` resolves once the new key's hash is on disk.
   */
  rotateKey(id: string, by: string): RotateResult {
    const identity = this.deps.identities.get(id);
    if (!identity) return notFound(id);
    const key = this.deps.identities.rotateKey(identity);
    const written = this.deps.identities.flush();
    const session = this.online.get(id);
    const now = Date.now();
    this.deps.connectionLog.record({ identityId: id, role: identity.role, event: 'rotate_key', timestamp: now, online: session !== undefined, reason: by });
    this.deps.bus.publish({ type: 'key_rotated', node: nodeRef(identity), by, at: now });
    if (session) {
      session.send({ type: 'system', event: 'key_rotated', by, timestamp: now });
      session.close(CLOSE_CODES.credentialsChanged, 'Identity key rotated by an admin');
    }
    return { ok: true, identity, key, wasOnline: session !== undefined, written };
  }

  /** Removes identities offline and not seen for `maxAgeMs`; resolves to how many, once on disk. */
  async forgetOffline(maxAgeMs: number, now = Date.now()): Promise<number> {
    const stale = this.deps.identities.offlineSince(now - maxAgeMs, (id) => this.online.has(id));
    if (stale.length === 0) return 0;
    let dropped = 0;
    const writes: Promise<void>[] = [];
    for (const identity of stale) {
      const removal = this.forget(identity, 'forget-offline-after', 'forgotten');
      dropped += removal.dropped;
      writes.push(removal.written);
    }
    await Promise.all(writes);
    this.deps.logger.info('identities_forgotten', { count: stale.length, dropped_queued: dropped, offline_for_ms: maxAgeMs });
    return stale.length;
  }

  /** Drops an identity and the messages queued for it; a second call for the same one does nothing. */
  private forget(identity: Identity, by: string, reason: RemovalReason): { dropped: number; written: Promise<void> } {
    const { identities, queue, connectionLog, bus } = this.deps;
    if (identities.get(identity.id) !== identity) return { dropped: 0, written: Promise.resolve() };
    const pending = [...queue.pendingFor(identity.id)];
    const queueWritten = this.finishQueued(pending, 'expired');
    const removed = identities.remove(identity);
    const now = Date.now();
    // An ephemeral identity's disconnect is logged already; one line per `send` is enough.
    if (reason !== 'ephemeral') {
      connectionLog.record({ identityId: identity.id, role: identity.role, event: 'delete', timestamp: now, online: false, reason: `${reason} by ${by}` });
    }
    bus.publish({ type: 'identity_removed', node: nodeRef(identity), by, reason, dropped: pending.length, at: now });
    return { dropped: pending.length, written: Promise.all([queueWritten, removed]).then(() => undefined) };
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

  setBan(id: string, banned: boolean, by: string): BanResult {
    const identity = this.deps.identities.get(id);
    if (!identity) {
      return { ok: false, status: 404, code: 'not_found', message: `No employee has id "${id}"; list them with GET /employees.` };
    }
    if (identity.role !== 'employee') {
      return { ok: false, status: 409, code: 'not_an_employee', message: `"${id}" is a boss; only employees can be banned.` };
    }
    const now = Date.now();
    const session = this.online.get(id);
    if (identity.banned !== banned) {
      identity.banned = banned;
      this.deps.identities.save(identity);
      this.deps.connectionLog.record({ identityId: id, role: 'employee', event: banned ? 'ban' : 'unban', timestamp: now, online: session !== undefined, reason: by });
      this.deps.bus.publish({ type: banned ? 'ban' : 'unban', node: nodeRef(identity), by, at: now });
    }
    if (banned && session) {
      session.send({ type: 'system', event: 'banned', by, timestamp: now });
      session.close(CLOSE_CODES.banned, 'Banned by an admin');
    }
    return { ok: true, identity, online: banned ? false : session !== undefined };
  }
}

function notFound(id: string): AdminFailure {
  return { ok: false, status: 404, code: 'not_found', message: `No identity has id "${id.slice(0, 100)}"; list them with GET /api/connections.` };
}
