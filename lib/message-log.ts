// messages.db: the log of every routed message with its per-target result.
//
// CONTRACT (implementation pending). The file keeps NeDB's on-disk format (one JSON document
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

export declare class MessageLog {
  static open(options: MessageLogOptions): Promise<MessageLog>;
  /** Appends a record; returns false when the caller should stop reading input until 'drain'. */
  append(input: MessageRecordInput): { record: MessageRecord; belowHighWaterMark: boolean };
  /** Changes one target's status (queued -> delivered/expired) by appending a new version. */
  updateTarget(recordId: string, targetId: string, status: TargetStatus): void;
  onDrain(listener: () => void): void;
  /** Resolves when everything appended so far is written (and fsynced with `fsync`). */
  flush(): Promise<void>;
  /** Newest first, with the total count of matching edges. */
  query(query: CommunicationQuery): Promise<{ total: number; edges: CommunicationEdge[] }>;
  /** Records with timestamp >= since, oldest first (used to rebuild the dedupe window). */
  recordsSince(since: number): Promise<MessageRecord[]>;
  stats(): MessageLogStats;
  close(): Promise<void>;
}
