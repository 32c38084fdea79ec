// An identity's liveness: when it was last seen, connected, disconnected, heard from. Unlike its
// name, tags, meta or key, these only move forward, so copies of them from different places
// (a cluster's nodes, the cluster store) are merged by taking the latest, never replaced.

import type { Identity } from './identity-store';

export type Liveness = Pick<Identity, 'lastSeen' | 'lastConnectedAt' | 'lastDisconnectedAt' | 'lastHeartbeatAt' | 'lastSelfReportAt' | 'selfReportValid'>;

/** The times merged by taking the latest (selfReportValid goes with lastSelfReportAt). */
const TIMES = ['lastSeen', 'lastConnectedAt', 'lastDisconnectedAt', 'lastHeartbeatAt', 'lastSelfReportAt'] as const;

/** Names of every liveness field, as they appear in an identity's document. */
export const LIVENESS_FIELDS: readonly string[] = [...TIMES, 'selfReportValid'];

export function livenessOf(source: Liveness): Liveness {
  return {
    lastSeen: source.lastSeen,
    lastConnectedAt: source.lastConnectedAt,
    lastDisconnectedAt: source.lastDisconnectedAt,
    lastHeartbeatAt: source.lastHeartbeatAt,
    lastSelfReportAt: source.lastSelfReportAt,
    selfReportValid: source.selfReportValid,
  };
}

/** The liveness fields of a stored or announced object that are well formed; the others are left out. */
export function readLiveness(value: Record<string, unknown>): Partial<Liveness> {
  const seen: Partial<Liveness> = {};
  for (const field of TIMES) {
    const time = value[field];
    if (typeof time === 'number' && Number.isFinite(time)) seen[field] = time;
  }
  if (typeof value.selfReportValid === 'boolean') seen.selfReportValid = value.selfReportValid;
  return seen;
}

/** Moves each of `target`'s times forward to `seen`'s where that is later; never back. */
export function raiseLiveness(target: Liveness, seen: Partial<Liveness>): void {
  if (seen.lastSeen !== undefined && seen.lastSeen > target.lastSeen) target.lastSeen = seen.lastSeen;
  for (const field of ['lastConnectedAt', 'lastDisconnectedAt', 'lastHeartbeatAt'] as const) {
    const time = seen[field];
    if (typeof time === 'number' && time > (target[field] ?? -Infinity)) target[field] = time;
  }
  const reportedAt = seen.lastSelfReportAt;
  if (typeof reportedAt === 'number' && reportedAt > (target.lastSelfReportAt ?? -Infinity)) {
    target.lastSelfReportAt = reportedAt;
    target.selfReportValid = seen.selfReportValid ?? null;
  }
}
