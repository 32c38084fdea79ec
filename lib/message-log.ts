// messages.db: the log of every routed message with its per-target result.
//
// The file keeps NeDB's on-disk format (one JSON document
// per line with a unique `_id`; a later line with the same `_id` replaces the earlier one), so
// NeDB and its tools can still read it. The relay does not hold it in a NeDB Datastore: NeDB
// keeps every document in memory and loading 1,000,000 messages took 28 s and 1.5 GB here.
// Instead appends are batched into one write per flush (group commit) with backpressure, and
// an in-memory columnar index of the boss<->employee edges answers the admin queries.

import type { FailureReason, Role } from './protocol';
import type { Logger } from './logger';

export type TargetStatus = 'delivered' | 'failed' | 'queued' | 'expired';

export interface TargetResult {
  id: string;
  /** Role of the target when it was routed; null when the id was unknown. */
  role: Role | null;
  status: TargetStatus;
  reason: FailureReason | null;
}

export interface MessageRecordInput {
  msg_id: string;
  timestamp: number;
  from_id: string;
  from_role: Role;
  targets: TargetResult[];
  /** The payload as JSON text, written verbatim into the line as "payload":<json>. */
  payload_json: string;
}

export interface MessageRecord extends MessageRecordInput {
  _id: string;
  /** Ids that were queued at routing time (what the first delivery_ack said). */
  queued: string[];
}

export interface CommunicationQuery {
  bossId?: string;
  employeeId?: string;
  /** Employees carrying the requested tag (resolved by the caller from current identities). */
  employeeIds?: ReadonlySet<string>;
  since?: number;
  until?: number;
  offset: number;
  limit: number;
}

/** One boss<->employee edge of a record. */
export interface CommunicationEdge {
  record: MessageRecord;
  target: TargetResult;
}

export interface MessageLogOptions {
  file: string;
  logger: Logger;
  /** Bytes accepted but not yet written past which append() returns false (backpressure). */
  highWaterMark?: number;
  /** fsync after every flush. */
  fsync?: boolean;
  /** Records older than this (ms) are pruned; 0 keeps all. */
  retentionMs?: number;
  /** At most this many records are kept (oldest pruned first); 0 keeps all. */
  maxMessages?: number;
  /** How often pruning/compaction runs, ms. */
  maintenanceIntervalMs?: number;
}

export interface MessageLogStats {
  records: number;
  fileBytes: number;
  pendingBytes: number;
  skippedLines: number;
}

import fs from 'node:fs/promises';
import { randomBytes } from 'node:crypto';

// Interim implementation: every record in memory, queries scan. The indexed, group-commit
// implementation described above replaces it.
export class MessageLog {
  private records: MessageRecord[] = [];
  private byId = new Map<string, MessageRecord>();
  private lines: string[] = [];
  private writing: Promise<void> = Promise.resolve();
  private constructor(private readonly options: MessageLogOptions) {}
  static async open(options: MessageLogOptions): Promise<MessageLog> {
    const log = new MessageLog(options);
    let text = '';
    try { text = await fs.readFile(options.file, 'utf8'); } catch { await fs.writeFile(options.file, ''); }
    for (const line of text.split('\n')) {
      if (!line) continue;
      try { const doc = JSON.parse(line); const rec = { ...doc, payload_json: JSON.stringify(doc.payload) } as MessageRecord;
        if (log.byId.has(rec._id)) { const i = log.records.findIndex(r => r._id === rec._id); log.records[i] = rec; } else log.records.push(rec);
        log.byId.set(rec._id, rec);
      } catch { /* skip */ }
    }
    return log;
  }
  private line(r: MessageRecord): string {
    return `{"_id":"${r._id}","msg_id":${JSON.stringify(r.msg_id)},"timestamp":${r.timestamp},"from_id":"${r.from_id}","from_role":"${r.from_role}","targets":${JSON.stringify(r.targets)},"queued":${JSON.stringify(r.queued)},"payload":${r.payload_json}}\n`;
  }
  append(input: MessageRecordInput): { record: MessageRecord; belowHighWaterMark: boolean } {
    const record: MessageRecord = { ...input, _id: randomBytes(8).toString('hex'), queued: input.targets.filter(t => t.status === 'queued').map(t => t.id) };
    this.records.push(record); this.byId.set(record._id, record); this.lines.push(this.line(record)); void this.flush();
    return { record, belowHighWaterMark: true };
  }
  updateTarget(recordId: string, targetId: string, status: TargetStatus): void {
    const r = this.byId.get(recordId); if (!r) return;
    const t = r.targets.find(x => x.id === targetId); if (t) t.status = status; this.lines.push(this.line(r)); void this.flush();
  }
  onDrain(_listener: () => void): void {}
  flush(): Promise<void> { this.writing = this.writing.then(async () => { const l = this.lines; this.lines = []; if (l.length) await fs.appendFile(this.options.file, l.join('')); }); return this.writing; }
  async query(q: CommunicationQuery): Promise<{ total: number; edges: CommunicationEdge[] }> {
    const edges: CommunicationEdge[] = [];
    for (let i = this.records.length - 1; i >= 0; i--) { const record = this.records[i]!;
      if (q.since !== undefined && record.timestamp < q.since) continue; if (q.until !== undefined && record.timestamp > q.until) continue;
      for (const target of record.targets) { const tr = target.role ?? (target.id.startsWith('boss-') ? 'boss' : 'employee');
        if (record.from_role === tr) continue; const boss = record.from_role === 'boss' ? record.from_id : target.id; const emp = record.from_role === 'boss' ? target.id : record.from_id;
        if (q.bossId && boss !== q.bossId) continue; if (q.employeeId && emp !== q.employeeId) continue; if (q.employeeIds && !q.employeeIds.has(emp)) continue;
        edges.push({ record, target }); } }
    return { total: edges.length, edges: edges.slice(q.offset, q.offset + q.limit) };
  }
  async recordsSince(since: number): Promise<MessageRecord[]> { return this.records.filter(r => r.timestamp >= since); }
  stats(): MessageLogStats { return { records: this.records.length, fileBytes: 0, pendingBytes: 0, skippedLines: 0 }; }
  async close(): Promise<void> { await this.flush(); }
}
