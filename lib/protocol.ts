// The wire contract (../shared/PROTOCOL.md) as types, shared by the relay and RelayClient so
// the two can never drift apart. Validation of client frames lives here too: the relay checks
// every frame at the edge and trusts these types inside.

export type Role = 'boss' | 'employee';

export const PROTOCOL_ERROR_CODES = [
  // Part A
  'invalid_json',
  'auth_required',
  'invalid_role',
  'invalid_authkey',
  'invalid_identity',
  'identity_not_found',
  'invalid_identity_key',
  'role_mismatch',
  'banned',
  'invalid_name',
  'invalid_tags',
  'invalid_to',
  'invalid_health_report',
  'unsupported_type',
  // Part B
  'invalid_frame',
  'invalid_msg_id',
  'payload_too_large',
  'rate_limited',
  'too_many_targets',
  'server_full',
  'auth_throttled',
  'invalid_employee_key',
  'store_failed',
  // Part D: the cluster store cannot be reached; retry shortly.
  'cluster_unavailable',
  // Part C
  'invalid_status',
  'invalid_capacity',
  'task_not_found',
] as const;
export type ProtocolErrorCode = (typeof PROTOCOL_ERROR_CODES)[number];

export const CLOSE_CODES = {
  shuttingDown: 1001,
  /** Sent by ws itself: a frame far over the size limit, or text that is not UTF-8. */
  messageTooBig: 1009,
  /** Cluster: the node cannot reach its cluster store right now; reconnect shortly. */
  tryAgainLater: 1013,
  invalidText: 1007,
  replaced: 4000,
  authTimeout: 4001,
  authRejected: 4003,
  banned: 4008,
  /** Part B: an admin rotated this identity's key, or the boss key this session used was revoked or changed. */
  credentialsChanged: 4009,
  /** Part B: an admin deleted this identity. */
  identityDeleted: 4010,
  serverFull: 4013,
} as const;

export type FailureReason =
  | 'target_not_found'
  | 'target_banned'
  | 'target_offline'
  | 'target_slow'
  /** Part C: an `any:<tag>` target with no employee free to take it, and no queueing. */
  | 'no_available_target';

/** Part C: how urgently a message is handed out; orders every queue. */
export type Priority = 'high' | 'normal' | 'low';
export const PRIORITIES: readonly Priority[] = ['high', 'normal', 'low'];

/** Part C: what an employee says about itself; `dnd` takes it out of dispatch. */
export type EmployeeStatus = 'idle' | 'working' | 'dnd';
export const EMPLOYEE_STATUSES: readonly EmployeeStatus[] = ['idle', 'working', 'dnd'];

/** Part C: the most tasks one employee may hold at once. */
export const MAX_CAPACITY = 10_000;

// ---- client → relay ------------------------------------------------------------------------

export interface IdentityCredentials {
  id: string;
  key: string;
}

export interface AuthFrame {
  type: 'auth';
  role: Role;
  authkey?: string;
  /** Part B: the registration key an employee presents when the relay runs with --employee-key. */
  employee_key?: string;
  name?: string;
  tags?: string[];
  meta?: Record<string, unknown>;
  identity?: IdentityCredentials;
  /** Part B: a new identity that the relay forgets when this connection ends (never written to disk). */
  ephemeral?: boolean;
  /** Part C: tasks this employee takes at once (default 1). */
  capacity?: number;
}

export interface PingFrame {
  type: 'ping';
}

export interface HealthReportFrame {
  type: 'health_report';
  valid: boolean;
  details?: Record<string, unknown>;
}

/** `to`: an id, an array of ids, "*" or "all" (broadcast), or "tag:<name>" (part B). */
export type Target = string | string[];

export interface MessageFrame {
  type: 'message';
  to: Target;
  payload?: unknown;
  msg_id?: string;
  /** Part B: keep for an offline known target and deliver at its next auth. */
  queue?: boolean;
  /** Part B: how long a queued copy may wait, capped by the relay's maximum. */
  ttl_ms?: number;
  /** Part C: orders every queue (default normal). */
  priority?: Priority;
  /** Part C: the msg_id of the task this message answers. */
  in_reply_to?: string;
  /** Part C: lease of a task sent to `any:<tag>`, ms (else the relay's --task-timeout). */
  task_timeout_ms?: number;
}

/** Part C: an employee's availability; either field may be left out. */
export interface StatusFrame {
  type: 'status';
  status?: EmployeeStatus;
  capacity?: number;
}

/** Part C: the employee finished (or, with failed, gave up on) a dispatched task. */
export interface TaskDoneFrame {
  type: 'task_done';
  msg_id: string;
  failed?: boolean;
}

export type ClientFrame = AuthFrame | PingFrame | HealthReportFrame | MessageFrame | StatusFrame | TaskDoneFrame;

// ---- relay → client ------------------------------------------------------------------------

export interface HelloFrame {
  type: 'hello';
  message: string;
  schema?: Record<string, unknown>;
  timestamp: number;
}

export interface AuthOkFrame {
  type: 'auth_ok';
  id: string;
  key: string;
  role: Role;
  name: string | null;
  tags: string[];
  reconnected: boolean;
  timestamp: number;
}

export interface PongFrame {
  type: 'pong';
  timestamp: number;
}

export interface HealthReportAckFrame {
  type: 'health_report_ack';
  id: string;
  valid: boolean;
  timestamp: number;
}

export interface ForwardedMessageFrame {
  type: 'message';
  msg_id: string;
  from_id: string;
  from_role: Role;
  to: string;
  payload: unknown;
  /** Part C: the task this message answers. */
  in_reply_to?: string;
  /** Part C, on a dispatched task: the `any:<tag>` target it was sent to, and which try this is (1 first). */
  dispatch?: string;
  attempt?: number;
  /** Part C: present when the sender gave a priority other than normal. */
  priority?: Priority;
  timestamp: number;
}

export interface DeliveryFailure {
  id: string;
  reason: FailureReason;
}

export interface DeliveryAckFrame {
  type: 'delivery_ack';
  msg_id: string;
  delivered: string[];
  failed: DeliveryFailure[];
  /** Part B: targets that were offline and will get the message at their next auth. */
  queued?: string[];
  /** Part B: present and true when this msg_id was already routed inside the dedupe window. */
  duplicate?: boolean;
  timestamp: number;
}

export interface DeliveryUpdateFrame {
  type: 'delivery_update';
  msg_id: string;
  id: string;
  /** delivered/expired: part B queue; assigned/done/failed (and expired for a waiting task): part C dispatch. */
  status: 'delivered' | 'expired' | 'assigned' | 'done' | 'failed';
  /** Part C: the `any:<tag>` target of a dispatched task. */
  dispatch?: string;
  /** Part C, with assigned: which try this is. */
  attempt?: number;
  timestamp: number;
}

/** Part C: the answer to a status frame. */
export interface StatusAckFrame {
  type: 'status_ack';
  id: string;
  status: EmployeeStatus;
  capacity: number;
  in_progress: number;
  timestamp: number;
}

export interface ErrorFrame {
  type: 'error';
  code: ProtocolErrorCode;
  message: string;
  /** Present with rate_limited: when the client may send again. */
  retry_after_ms?: number;
  /** Part B: the msg_id of the message frame this error answers, when the relay could read it. */
  msg_id?: string;
  timestamp: number;
}

export interface SystemFrame {
  type: 'system';
  event: string;
  by?: string;
  timestamp: number;
}

export type ServerFrame =
  | HelloFrame
  | AuthOkFrame
  | PongFrame
  | HealthReportAckFrame
  | ForwardedMessageFrame
  | DeliveryAckFrame
  | DeliveryUpdateFrame
  | StatusAckFrame
  | ErrorFrame
  | SystemFrame;

// ---- validation at the edge ----------------------------------------------------------------

export interface FrameError {
  code: ProtocolErrorCode;
  message: string;
}

export type Checked<T> = { ok: true; value: T } | { ok: false; error: FrameError };

const fail = (code: ProtocolErrorCode, message: string): { ok: false; error: FrameError } => ({
  ok: false,
  error: { code, message },
});

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** JSON text that holds an object (as stored or published by this relay), or null. */
export function parseObject(text: string): Record<string, unknown> | null {
  try {
    const value: unknown = JSON.parse(text);
    return isPlainObject(value) ? value : null;
  } catch {
    return null;
  }
}

/**
 * Deepest nesting of objects and arrays a frame may have; the frame object itself is level 1,
 * so a message payload may nest 127 levels. Deeper frames are refused before JSON.parse: parsing
 * (and later re-encoding) deep nesting costs milliseconds per frame, enough for a few hundred
 * such frames to stall every other connection.
 */
export const MAX_FRAME_DEPTH = 128;

const QUOTE = 0x22;
const BACKSLASH = 0x5c;

/**
 * Whether JSON text nests objects and arrays deeper than `limit`, in one pass over the text:
 * brackets inside strings do not count and escaped quotes do not end a string. For text that is
 * not valid JSON the answer covers the valid prefix, which is all JSON.parse reads of it.
 */
export function nestsDeeperThan(text: string, limit: number): boolean {
  if (text.length <= limit) return false;
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x5b || c === 0x7b) {
      // [ or {
      if (++depth > limit) return true;
    } else if (c === 0x5d || c === 0x7d) {
      // ] or }
      depth--;
    } else if (c === QUOTE) {
      i = stringEnd(text, i);
      if (i < 0) return false;
    }
  }
  return false;
}

/** Index of the quote that closes the string opened at `open`, or -1 when the text ends first. */
function stringEnd(text: string, open: number): number {
  const length = text.length;
  // Short strings (keys, ids) are cheapest to walk character by character.
  const shortEnd = Math.min(length, open + 33);
  let i = open + 1;
  for (; i < shortEnd; i++) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) return i;
    if (c === BACKSLASH) i++;
  }
  if (i >= length) return -1;
  // A long one: the next quote ends it unless a backslash stands right before it, so a long
  // payload string costs one native search; only then is the rest walked escape by escape.
  const quote = text.indexOf('"', i);
  if (quote < 0) return -1;
  if (text.charCodeAt(quote - 1) !== BACKSLASH) return quote;
  for (; i < length; i++) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) return i;
    if (c === BACKSLASH) i++;
  }
  return -1;
}

/** A frame is text holding one JSON object with a string `type`, nested at most MAX_FRAME_DEPTH deep. */
export function decodeFrame(text: string): Checked<Record<string, unknown> & { type: string }> {
  if (nestsDeeperThan(text, MAX_FRAME_DEPTH)) {
    return fail(
      'invalid_json',
      `Frame nests objects or arrays more than ${MAX_FRAME_DEPTH} levels deep: send a flatter JSON value (the connection stays open).`,
    );
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return fail('invalid_json', 'Frame is not valid JSON: send one JSON object per frame, e.g. {"type":"ping"}.');
  }
  if (!isPlainObject(parsed) || typeof parsed.type !== 'string') {
    return fail('invalid_json', 'Frame must be a JSON object with a string "type", e.g. {"type":"ping"}.');
  }
  return { ok: true, value: parsed as Record<string, unknown> & { type: string } };
}

export interface EmployeeProfile {
  name: string;
  tags: string[];
}

/** Name and tags of an employee's registration, trimmed and de-duplicated; never coerced. */
export function checkEmployeeProfile(raw: Record<string, unknown>): Checked<EmployeeProfile> {
  if (typeof raw.name !== 'string' || raw.name.trim() === '') {
    return fail('invalid_name', 'An employee registers with a non-empty "name" string, e.g. "name":"Researcher-1".');
  }
  if (!Array.isArray(raw.tags) || raw.tags.length === 0) {
    return fail('invalid_tags', 'An employee registers with "tags": a non-empty array of strings, e.g. ["research"].');
  }
  const tags: string[] = [];
  for (const tag of raw.tags) {
    if (typeof tag !== 'string' || tag.trim() === '') {
      return fail('invalid_tags', 'Every tag must be a non-empty string, e.g. "tags":["research","risk"].');
    }
    const trimmed = tag.trim();
    if (!tags.includes(trimmed)) tags.push(trimmed);
  }
  return { ok: true, value: { name: raw.name.trim(), tags } };
}

export function checkRole(raw: Record<string, unknown>): Checked<Role> {
  if (raw.role === 'boss' || raw.role === 'employee') return { ok: true, value: raw.role };
  return fail('invalid_role', 'Field "role" must be "boss" or "employee".');
}

/** Reconnect credentials: both id and key, as strings. Absent identity is `undefined`. */
export function checkIdentity(raw: Record<string, unknown>): Checked<IdentityCredentials | undefined> {
  if (raw.identity === undefined || raw.identity === null) return { ok: true, value: undefined };
  const identity = raw.identity;
  if (
    !isPlainObject(identity) ||
    typeof identity.id !== 'string' ||
    identity.id === '' ||
    typeof identity.key !== 'string' ||
    identity.key === ''
  ) {
    return fail('invalid_identity', 'Reconnect needs "identity":{"id":"…","key":"…"}, both as given in auth_ok.');
  }
  return { ok: true, value: { id: identity.id, key: identity.key } };
}

export type ParsedTarget =
  | { kind: 'broadcast' }
  | { kind: 'tag'; tag: string }
  /** Part C: exactly one available employee with the tag ("*": any employee). */
  | { kind: 'any'; tag: string }
  | { kind: 'ids'; ids: string[] };

/** `to` as sent: one id, an array of ids, "*"/"all", "tag:<name>" or "any:<name>"/"any:*". */
export function checkTarget(to: unknown): Checked<ParsedTarget> {
  const invalid = () =>
    fail('invalid_to', 'Field "to" must be an id, an array of ids, "*" or "all" for broadcast, "tag:<name>", or "any:<name>" / "any:*" for one free employee.');
  if (typeof to === 'string') {
    const single = to.trim();
    if (single === '') return invalid();
    if (single === '*' || single === 'all') return { ok: true, value: { kind: 'broadcast' } };
    if (single.startsWith('tag:')) {
      const tag = single.slice(4).trim();
      if (tag === '') return invalid();
      return { ok: true, value: { kind: 'tag', tag } };
    }
    if (single.startsWith('any:')) {
      const tag = single.slice(4).trim();
      if (tag === '') return invalid();
      return { ok: true, value: { kind: 'any', tag } };
    }
    return { ok: true, value: { kind: 'ids', ids: [single] } };
  }
  if (Array.isArray(to)) {
    // A Set, not ids.includes(): one frame can carry ~100,000 ids before the target limit is
    // checked, and a quadratic de-duplication of those blocks the event loop for seconds.
    const ids = new Set<string>();
    for (const item of to) {
      if (typeof item !== 'string') return invalid();
      const id = item.trim();
      if (id === '') continue;
      if (id === '*' || id === 'all') return { ok: true, value: { kind: 'broadcast' } };
      ids.add(id);
    }
    if (ids.size === 0) return invalid();
    return { ok: true, value: { kind: 'ids', ids: [...ids] } };
  }
  return invalid();
}

// ---- part C fields -------------------------------------------------------------------------

/** The `any:<tag>` text of a dispatch target, as acks and updates name it. */
export function anyTargetName(tag: string): string {
  return `any:${tag}`;
}

/** `priority` of a message: absent means normal. */
export function checkPriority(value: unknown): Checked<Priority> {
  if (value === undefined || value === null) return { ok: true, value: 'normal' };
  if (value === 'high' || value === 'normal' || value === 'low') return { ok: true, value };
  return fail('invalid_frame', 'Field "priority" must be "high", "normal" or "low".');
}

/** `capacity` at auth or in a status frame: absent is undefined. */
export function checkCapacity(value: unknown): Checked<number | undefined> {
  if (value === undefined || value === null) return { ok: true, value: undefined };
  if (typeof value === 'number' && Number.isInteger(value) && value >= 1 && value <= MAX_CAPACITY) return { ok: true, value };
  return fail('invalid_capacity', `Field "capacity" must be a whole number of tasks from 1 to ${MAX_CAPACITY}, e.g. "capacity":2.`);
}

/** A status frame: status, capacity or both. */
export function checkStatusFrame(raw: Record<string, unknown>): Checked<{ status: EmployeeStatus | undefined; capacity: number | undefined }> {
  const status = raw.status;
  if (status !== undefined && status !== 'idle' && status !== 'working' && status !== 'dnd') {
    return fail('invalid_status', 'Field "status" must be "idle", "working" or "dnd".');
  }
  const capacity = checkCapacity(raw.capacity);
  if (!capacity.ok) return capacity;
  if (status === undefined && capacity.value === undefined) {
    return fail('invalid_status', 'A status frame carries "status" ("idle", "working" or "dnd"), "capacity" (tasks at once), or both.');
  }
  return { ok: true, value: { status, capacity: capacity.value } };
}

/** `in_reply_to` of a message: a msg_id string, or absent. */
export function checkInReplyTo(value: unknown, maxLength: number): Checked<string | undefined> {
  if (value === undefined || value === null) return { ok: true, value: undefined };
  if (typeof value === 'string' && value !== '' && value.length <= maxLength) return { ok: true, value };
  return fail('invalid_frame', `Field "in_reply_to" must be the msg_id of the task answered, a string of at most ${maxLength} characters.`);
}

/** `task_timeout_ms` of a message: a positive number, or absent. */
export function checkTaskTimeout(value: unknown): Checked<number | undefined> {
  if (value === undefined || value === null) return { ok: true, value: undefined };
  if (typeof value === 'number' && Number.isFinite(value) && value >= 1 && value <= 2 ** 31 - 1) return { ok: true, value: Math.round(value) };
  return fail('invalid_frame', 'Field "task_timeout_ms" must be a positive number of milliseconds (at most 2147483647).');
}
