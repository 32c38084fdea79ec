// The admin views of the workforce: node listings with status and health, the workforce
// summary, and communications rows built from message-log edges. Pure functions of the
// identities and who is online, so the HTTP layer only parses and answers.

import type { Identity, IdentityStore } from './identity-store';
import type { CommunicationEdge } from './message-log';
import type { Role } from './protocol';

export const HEARTBEAT_STALE_MS = 60_000;
export const SELF_REPORT_STALE_MS = 180_000;

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
}

export type IsOnline = (id: string) => boolean;

/** Part C: an employee's availability for dispatch, as /admin/workforce shows it. */
export interface DispatchView {
  status: 'idle' | 'working' | 'dnd' | 'offline';
  capacity: number;
  in_progress: number;
}
export type DispatchOf = (id: string) => DispatchView | null;

export function nodeStatus(identity: Identity, online: boolean): NodeStatus {
  if (identity.banned) return 'banned';
  return online ? 'online' : 'offline';
}

export function nodeView(identity: Identity, online: boolean): NodeView {
  return {
    id: identity.id,
    role: identity.role,
    name: identity.name,
    tags: identity.tags,
    online,
    status: nodeStatus(identity, online),
    banned: identity.banned,
    created_at: identity.createdAt,
    last_seen: identity.lastSeen,
    meta: identity.meta,
  };
}

export function nodeHealth(identity: Identity, online: boolean, now: number): NodeHealth {
  const heartbeatAge = Math.max(0, now - identity.lastSeen);
  const heartbeatStale = heartbeatAge > HEARTBEAT_STALE_MS;
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
    if (identity.selfReportValid === null) reasons.push('self_report_missing');
    else if (!identity.selfReportValid) reasons.push('self_report_invalid');
    else if (reportStale) reasons.push('self_report_stale');
    if (reasons.length > 0) overall = 'degraded';
  }
  return {
    overall,
    reasons,
    status: nodeStatus(identity, online),
    online,
    heartbeat: { last_seen_at: identity.lastSeen, age_ms: heartbeatAge, stale: heartbeatStale, stale_threshold_ms: HEARTBEAT_STALE_MS },
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

function sortedIdentities(identities: IdentityStore, role?: Role): Identity[] {
  const list: Identity[] = [];
  for (const identity of identities.all()) if (role === undefined || identity.role === role) list.push(identity);
  return list.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

export function listNodes(identities: IdentityStore, isOnline: IsOnline, role?: Role): NodeView[] {
  return sortedIdentities(identities, role).map((identity) => nodeView(identity, isOnline(identity.id)));
}

type WorkforceNode = NodeView & { health: NodeHealth; dispatch?: DispatchView };

export function workforce(identities: IdentityStore, isOnline: IsOnline, tag: string | null, now: number, dispatchOf: DispatchOf = () => null) {
  const bosses: WorkforceNode[] = [];
  const employees: WorkforceNode[] = [];
  const byTag: Record<string, { count: number; employee_ids: string[]; employees: WorkforceNode[] }> = {};
  const health = { healthy: 0, degraded: 0, unhealthy: 0 };
  let online = 0;
  let banned = 0;
  let total = 0;
  for (const identity of sortedIdentities(identities)) {
    const isUp = isOnline(identity.id);
    if (identity.role === 'employee' && tag !== null && !identity.tags.includes(tag)) continue;
    const node: WorkforceNode = { ...nodeView(identity, isUp), health: nodeHealth(identity, isUp, now) };
    total++;
    health[node.health.overall]++;
    if (isUp) online++;
    if (identity.banned) banned++;
    if (identity.role === 'boss') {
      bosses.push(node);
      continue;
    }
    node.dispatch = dispatchOf(identity.id) ?? { status: isUp ? 'idle' : 'offline', capacity: 1, in_progress: 0 };
    employees.push(node);
    for (const t of identity.tags) {
      const group = (byTag[t] ??= { count: 0, employee_ids: [], employees: [] });
      group.count++;
      group.employee_ids.push(node.id);
      group.employees.push(node);
    }
  }
  return {
    summary: {
      total_nodes: total,
      boss_count: bosses.length,
      employee_count: employees.length,
      online_count: online,
      offline_count: total - online,
      banned_count: banned,
      health,
      filtered_by_tag: tag,
    },
    bosses,
    employees,
    employees_by_tag: byTag,
    timestamp: now,
  };
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
