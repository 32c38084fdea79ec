// The admin views of the workforce: node listings with status and health, the workforce
// summary, and communications rows built from message-log edges. Pure functions of the
// identities and the live connections, so the HTTP layer only parses and answers.

import type { Identity, IdentityStore } from './identity-store';
import type { CommunicationEdge } from './message-log';
import type { Role } from './protocol';

/** Heartbeat threshold when the relay sends no pings (two default ping intervals otherwise). */
export const HEARTBEAT_STALE_MS = 60_000;
export const SELF_REPORT_STALE_MS = 180_000;

/**
 * A heartbeat is stale after two ping intervals without a frame or a pong: the silence after
 * which the liveness sweep ends the connection (60 s with the default 30 s interval).
 */
export function heartbeatStaleMs(pingIntervalMs: number): number {
  return pingIntervalMs > 0 ? 2 * pingIntervalMs : HEARTBEAT_STALE_MS;
}

/** What the views know of the live connections. */
export interface Liveness {
  /** When the node's open socket last carried a frame or a pong; undefined while it is offline. */
  lastActivity(id: string): number | undefined;
  /** The relay node holding the identity's socket (docs/CLUSTER.md); null while it is offline. */
  node(id: string): string | null;
  heartbeatStaleMs: number;
}

export type NodeStatus = 'online' | 'offline' | 'banned';
export type HealthOverall = 'healthy' | 'degraded' | 'unhealthy';

export interface NodeHealth {
  overall: HealthOverall;
  reasons: string[];
  status: NodeStatus;
  online: boolean;
  heartbeat: { last_seen_at: number | null; age_ms: number | null; stale: boolean; stale_threshold_ms: number };
  self_report: { valid: boolean | null; last_report_at: number | null; age_ms: number | null; stale: boolean; stale_threshold_ms: number };
  connection: { last_connected_at: number | null; last_disconnected_at: number | null; websocket_open: boolean };
}

export interface NodeView {
  id: string;
  role: Role;
  name: string | null;
  tags: string[];
  online: boolean;
  status: NodeStatus;
  banned: boolean;
  created_at: number;
  last_seen: number;
  meta: Record<string, unknown> | null;
  /** Bosses only: the credential of its last auth ("authkey" or a --boss-keys-file name); null before any since it was recorded. */
  credential?: string | null;
  /** The relay node holding its socket; null while offline. */
  node: string | null;
}

export function nodeStatus(identity: Identity, online: boolean): NodeStatus {
  if (identity.banned) return 'banned';
  return online ? 'online' : 'offline';
}

/** The newest sign of life: the stored last_seen, or a later frame or pong on the open socket. */
function lastSeen(identity: Identity, lastActivityAt: number | null | undefined): number {
  return lastActivityAt != null && lastActivityAt > identity.lastSeen ? lastActivityAt : identity.lastSeen;
}

export function nodeView(identity: Identity, online: boolean, lastActivityAt: number | null = null, node: string | null = null): NodeView {
  return {
    id: identity.id,
    role: identity.role,
    name: identity.name,
    tags: identity.tags,
    online,
    status: nodeStatus(identity, online),
    banned: identity.banned,
    created_at: identity.createdAt,
    last_seen: lastSeen(identity, lastActivityAt),
    meta: identity.meta,
    ...(identity.role === 'boss' && { credential: identity.credential }),
    node: online ? node : null,
  };
}

/**
 * A node's health. Any frame or pong is a heartbeat (`lastActivityAt`: the open socket's last
 * one). Only employees send self reports, so only they are judged by them.
 */
export function nodeHealth(identity: Identity, online: boolean, now: number, staleThresholdMs = HEARTBEAT_STALE_MS, lastActivityAt: number | null = null): NodeHealth {
  const heartbeatAt = lastSeen(identity, lastActivityAt);
  const heartbeatAge = Math.max(0, now - heartbeatAt);
  const heartbeatStale = heartbeatAge > staleThresholdMs;
  const reportAge = identity.lastSelfReportAt === null ? null : Math.max(0, now - identity.lastSelfReportAt);
  const reportStale = reportAge === null || reportAge > SELF_REPORT_STALE_MS;
  const reasons: string[] = [];
  let overall: HealthOverall = 'healthy';
  if (identity.banned) {
    overall = 'unhealthy';
    reasons.push('banned');
  } else if (!online) {
    overall = 'unhealthy';
    reasons.push('offline');
  } else {
    if (heartbeatStale) reasons.push('heartbeat_stale');
    if (identity.role === 'employee') {
      if (identity.selfReportValid === null) reasons.push('self_report_missing');
      else if (!identity.selfReportValid) reasons.push('self_report_invalid');
      else if (reportStale) reasons.push('self_report_stale');
    }
    if (reasons.length > 0) overall = 'degraded';
  }
  return {
    overall,
    reasons,
    status: nodeStatus(identity, online),
    online,
    heartbeat: { last_seen_at: heartbeatAt, age_ms: heartbeatAge, stale: heartbeatStale, stale_threshold_ms: staleThresholdMs },
    self_report: {
      valid: identity.selfReportValid,
      last_report_at: identity.lastSelfReportAt,
      age_ms: reportAge,
      stale: reportStale,
      stale_threshold_ms: SELF_REPORT_STALE_MS,
    },
    connection: {
      last_connected_at: identity.lastConnectedAt,
      last_disconnected_at: identity.lastDisconnectedAt,
      websocket_open: online,
    },
  };
}

/**
 * Registration order: by created_at, ties in the store's order (the order of creation while the
 * relay runs, the data file's order after a restart). The sort is stable, so the tie-break is too.
 */
function registrationOrder(identities: IdentityStore, role?: Role): Identity[] {
  const list: Identity[] = [];
  for (const identity of identities.all()) if (role === undefined || identity.role === role) list.push(identity);
  return list.sort((a, b) => a.createdAt - b.createdAt);
}

export function listNodes(identities: IdentityStore, liveness: Liveness, role?: Role): NodeView[] {
  return registrationOrder(identities, role).map((identity) => {
    const activity = liveness.lastActivity(identity.id);
    return nodeView(identity, activity !== undefined, activity, liveness.node(identity.id));
  });
}

interface TagGroup {
  ids: string[];
  nodes: Buffer[];
}

const COMMA = Buffer.from(',');

/** `items` separated by commas, as parts of a body. */
function pushList(parts: Buffer[], items: Buffer[]): void {
  for (let i = 0; i < items.length; i++) {
    if (i > 0) parts.push(COMMA);
    parts.push(items[i]!);
  }
}

/**
 * GET /admin/workforce as a compact JSON body: {summary, bosses, employees, employees_by_tag,
 * timestamp}, nodes in registration order with their health. Each node is serialised and
 * encoded once, and its bytes reused in every tag group it belongs to: the body is copied
 * together once, instead of every employee being serialised again per tag.
 */
/** Part C: an employee's availability for dispatch, as /admin/workforce shows it. */
export interface DispatchView {
  status: 'idle' | 'working' | 'dnd' | 'offline';
  capacity: number;
  in_progress: number;
}
export type DispatchOf = (id: string) => DispatchView | null;

export function workforceJson(identities: IdentityStore, liveness: Liveness, tag: string | null, now: number, dispatchOf: DispatchOf = () => null): Buffer {
  const bosses: Buffer[] = [];
  const employees: Buffer[] = [];
  // A Map, not an object: a tag may be any string, "__proto__" included.
  const byTag = new Map<string, TagGroup>();
  const health = { healthy: 0, degraded: 0, unhealthy: 0 };
  let online = 0;
  let banned = 0;
  for (const identity of registrationOrder(identities)) {
    if (identity.role === 'employee' && tag !== null && !identity.tags.includes(tag)) continue;
    const activity = liveness.lastActivity(identity.id);
    const isUp = activity !== undefined;
    const view = nodeView(identity, isUp, activity, isUp ? liveness.node(identity.id) : null);
    const nodeHealthView = nodeHealth(identity, isUp, now, liveness.heartbeatStaleMs, activity);
    const dispatch = identity.role === 'employee' ? { dispatch: dispatchOf(identity.id) ?? { status: isUp ? 'idle' : 'offline', capacity: 1, in_progress: 0 } } : {};
    const text = Buffer.from(JSON.stringify({ ...view, health: nodeHealthView, ...dispatch }));
    health[nodeHealthView.overall]++;
    if (isUp) online++;
    if (identity.banned) banned++;
    if (identity.role === 'boss') {
      bosses.push(text);
      continue;
    }
    employees.push(text);
    for (const t of identity.tags) {
      let group = byTag.get(t);
      if (!group) byTag.set(t, (group = { ids: [], nodes: [] }));
      group.ids.push(view.id);
      group.nodes.push(text);
    }
  }
  const total = bosses.length + employees.length;
  const summary = {
    total_nodes: total,
    boss_count: bosses.length,
    employee_count: employees.length,
    online_count: online,
    offline_count: total - online,
    banned_count: banned,
    health,
    filtered_by_tag: tag,
  };
  const parts: Buffer[] = [Buffer.from(`{"summary":${JSON.stringify(summary)},"bosses":[`)];
  pushList(parts, bosses);
  parts.push(Buffer.from('],"employees":['));
  pushList(parts, employees);
  parts.push(Buffer.from('],"employees_by_tag":{'));
  let first = true;
  for (const [name, group] of byTag) {
    parts.push(Buffer.from(`${first ? '' : ','}${JSON.stringify(name)}:{"count":${group.ids.length},"employee_ids":${JSON.stringify(group.ids)},"employees":[`));
    pushList(parts, group.nodes);
    parts.push(Buffer.from(']}'));
    first = false;
  }
  parts.push(Buffer.from(`},"timestamp":${now}}`));
  return Buffer.concat(parts);
}

export interface CommNode {
  id: string;
  role: Role | 'unknown';
  name: string | null;
  tags: string[];
}

function commNode(id: string, role: Role | null, identities: IdentityStore): CommNode {
  const identity = identities.get(id);
  const inferred: Role | 'unknown' = id.startsWith('boss-') ? 'boss' : id.startsWith('employee-') ? 'employee' : 'unknown';
  return { id, role: identity?.role ?? role ?? inferred, name: identity?.name ?? null, tags: identity?.tags ?? [] };
}

export function communicationRow(edge: CommunicationEdge, identities: IdentityStore) {
  const { record, target } = edge;
  const from = commNode(record.from_id, record.from_role, identities);
  const to = commNode(target.id, target.role, identities);
  const bossToEmployee = from.role === 'boss';
  let payload: unknown = null;
  try {
    payload = JSON.parse(record.payload_json);
  } catch {
    payload = null;
  }
  return {
    msg_id: record.msg_id,
    timestamp: record.timestamp,
    direction: bossToEmployee ? 'boss_to_employee' : 'employee_to_boss',
    boss: bossToEmployee ? from : to,
    employee: bossToEmployee ? to : from,
    from,
    to,
    delivery: { status: target.status, reason: target.reason },
    payload,
  };
}
