// GET /admin/communications as a page of rows: one node's own log (messages.db), and in a
// cluster the merge of every node's page, since each node logs only its own senders' messages.

import type { IdentityStore } from './identity-store';
import type { MessageLog } from './message-log';
import { communicationRow } from './workforce';

export interface CommunicationsFilters {
  boss_id: string | null;
  employee_id: string | null;
  tag: string | null;
  since: number | null;
  until: number | null;
}

export interface CommunicationsQuery {
  filters: CommunicationsFilters;
  offset: number;
  limit: number;
}

export type CommunicationRow = ReturnType<typeof communicationRow>;

export interface CommunicationsPage {
  total: number;
  rows: CommunicationRow[];
}

/** In a cluster every node returns its first offset+limit rows; past this the query is refused. */
export const MAX_CLUSTER_WINDOW = 10_000;

export async function communicationsPage(messageLog: MessageLog, identities: IdentityStore, query: CommunicationsQuery): Promise<CommunicationsPage> {
  const { filters, offset, limit } = query;
  const { total, edges } = await messageLog.query({
    ...(filters.boss_id !== null && { bossId: filters.boss_id }),
    ...(filters.employee_id !== null && { employeeId: filters.employee_id }),
    ...(filters.tag !== null && { employeeIds: identities.withTag(filters.tag) }),
    ...(filters.since !== null && { since: filters.since }),
    ...(filters.until !== null && { until: filters.until }),
    offset,
    limit,
  });
  return { total, rows: edges.map((edge) => communicationRow(edge, identities)) };
}

/** Merges pages that each start at offset 0 (newest first) into the page at `offset`. */
export function mergePages(pages: readonly CommunicationsPage[], offset: number, limit: number): CommunicationsPage {
  const total = pages.reduce((sum, page) => sum + page.total, 0);
  const rows = pages.flatMap((page) => page.rows).sort((a, b) => b.timestamp - a.timestamp);
  return { total, rows: rows.slice(offset, offset + limit) };
}

/** A page another node sent back, checked before it is merged. */
export function readPage(value: unknown): CommunicationsPage | null {
  if (typeof value !== 'object' || value === null) return null;
  const { total, rows } = value as Record<string, unknown>;
  if (typeof total !== 'number' || !Array.isArray(rows)) return null;
  const valid = rows.filter((row): row is CommunicationRow => typeof row === 'object' && row !== null && typeof (row as { timestamp?: unknown }).timestamp === 'number');
  return { total, rows: valid };
}

/** A query another node asked, checked before it runs. */
export function readQuery(value: unknown): CommunicationsQuery | null {
  if (typeof value !== 'object' || value === null) return null;
  const { filters, offset, limit } = value as Record<string, unknown>;
  if (typeof filters !== 'object' || filters === null) return null;
  if (!Number.isInteger(offset) || !Number.isInteger(limit) || (offset as number) < 0 || (limit as number) < 1 || (limit as number) > MAX_CLUSTER_WINDOW) return null;
  const f = filters as Record<string, unknown>;
  const text = (key: string) => (typeof f[key] === 'string' ? (f[key] as string) : null);
  const num = (key: string) => (typeof f[key] === 'number' ? (f[key] as number) : null);
  return {
    filters: { boss_id: text('boss_id'), employee_id: text('employee_id'), tag: text('tag'), since: num('since'), until: num('until') },
    offset: offset as number,
    limit: limit as number,
  };
}
