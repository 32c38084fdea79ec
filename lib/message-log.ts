// messages.db: the log of every routed message with its per-target result.
//
// The file keeps NeDB's on-disk format (one JSON document per line with a unique `_id`; a
// later line with the same `_id` replaces the earlier one), so NeDB and its tools can read it. The relay does not hold it in a NeDB Datastore: NeDB
// keeps every document in memory and loading 1,000,000 messages took 28 s and 1.5 GB here.
// Instead appends are batched into one write per flush (group commit) with backpressure, and
// an in-memory columnar index (message-index.ts) answers the admin queries by reading only the
// lines of the page asked for. Records with a queued target are also held in memory until every
// target is settled, because their status changes are written as new versions.

import { randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { anchorLine, anchorOf, ANCHOR_ID, chainLine, GENESIS_HASH, lineHash, LINK_SUFFIX_LENGTH } from './audit-chain';
import { applyFileMode, DEFAULT_FILE_MODE, dirModeFor } from './data-dir';
import { outcomeFields, type AckBody, type RoutingOutcome } from './delivery-ack';
import type { Logger } from './logger';
import { MessageIndex, roleFromId, type EdgeFilter } from './message-index';
import type { DeliveryFailure, FailureReason, Role } from './protocol';

export type TargetStatus = 'delivered' | 'failed' | 'queued' | 'expired';

export interface TargetResult {
  id: string;
  /** Role of the target when it was routed; null when the id was unknown. */
  role: Role | null;
  status: TargetStatus;
  reason: FailureReason | null;
}

/** A routed message as the router hands it over: the outcome lists are those of its delivery_ack. */
export interface MessageRecordInput extends RoutingOutcome {
  msg_id: string;
  timestamp: number;
  from_id: string;
  from_role: Role;
  /** The payload as JSON text. */
  payload_json: string;
}

/** A record as read back: one result per target, in the order delivered, failed, queued. */
export interface MessageRecord {
  _id: string;
  msg_id: string;
  timestamp: number;
  from_id: string;
  from_role: Role;
  targets: TargetResult[];
  /** Ids that were queued at routing time (what the first delivery_ack said). */
  queued: string[];
  payload_json: string;
}

/** Which boss<->employee edges to list; employeeIds are the carriers of a requested tag. */
export type CommunicationQuery = EdgeFilter;

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
  /** Permission bits of the file, its rewrites and copies. Default 0o600. */
  fileMode?: number;
}

export interface MessageLogStats {
  records: number;
  fileBytes: number;
  pendingBytes: number;
  skippedLines: number;
}


const DEFAULT_HIGH_WATER_MARK = 8 * 1024 * 1024;
/**
 * A write starts once this much is pending, or LINGER_MS after the first pending line: on two
 * cores, a thread-pool write per message competes with the senders and receivers for CPU.
 */
const LINGER_BYTES = 64 * 1024;
const LINGER_MS = 2;
const NEWLINE = 0x0a;
/**
 * What a damaged line is overwritten with once the file has been copied aside (padded with
 * spaces to the line's length, so no offset moves): an empty document, which the relay and
 * NeDB both pass over.
 */
const SET_ASIDE = '{}';

interface ParsedLine {
  record: MessageRecord | null;
  deletedId: string | null;
}

/**
 * A line as NeDB would store it. The targets are stored as the ack lists them (one string per
 * delivered or queued id, an {id, reason} per failure), so the router serialises them once for
 * both, and a broadcast to 1,000 costs 1,000 ids rather than 1,000 objects; a queued target's
 * later outcome goes into "settled". Each target's role is its id's prefix (PROTOCOL.md: ids are
 * `boss-…` / `employee-…`). NeDB refuses to load documents whose field names contain "." or start
 * with "$", and payload keys are the clients' to choose: a payload whose JSON text has neither
 * character anywhere is written as it is ("payload"), any other as a JSON string
 * ("payload_json"), which costs an escaping pass. write() appends the audit chain's hash field
 * (audit-chain.ts) and the newline.
 */
function serialise(id: string, record: Omit<MessageRecordInput, keyof RoutingOutcome>, outcomeText: string, settled: string): string {
  return (
    `{"_id":"${id}","msg_id":${JSON.stringify(record.msg_id)},"timestamp":${record.timestamp},` +
    `"from_id":${JSON.stringify(record.from_id)},"from_role":"${record.from_role}",` +
    `${outcomeText}${settled},${payloadField(record.payload_json)}}`
  );
}

/** A later version of a record: its first outcome as routed, plus what became of its queued targets. */
function serialiseVersion(record: MessageRecord): string {
  const queued = new Set(record.queued);
  const delivered: string[] = [];
  const failed: DeliveryFailure[] = [];
  const settled: Record<string, TargetStatus> = {};
  for (const target of record.targets) {
    if (queued.has(target.id)) {
      if (target.status !== 'queued') settled[target.id] = target.status;
    } else if (target.status === 'delivered') delivered.push(target.id);
    else if (target.reason !== null) failed.push({ id: target.id, reason: target.reason });
  }
  const settledText = Object.keys(settled).length > 0 ? `,"settled":${JSON.stringify(settled)}` : '';
  return serialise(record._id, record, outcomeFields({ delivered, failed, queued: record.queued }), settledText);
}

function payloadField(json: string): string {
  return json.indexOf('.') < 0 && json.indexOf('$') < 0 ? `"payload":${json}` : `"payload_json":${JSON.stringify(json)}`;
}

/** Where the payload field starts: the relay writes it last, as "payload" or "payload_json". */
const PAYLOAD_FIELD = ',"payload';

/**
 * Reads a line. Without `withPayload` only the fields before the payload are parsed: the relay
 * writes it last, and inside JSON strings quotes are escaped, so the first `,"payload` is the
 * field itself. Lines in any other shape are parsed whole.
 */
function parseLine(text: string, withPayload = true): ParsedLine | null {
  let doc: unknown;
  try {
    const cut = withPayload ? -1 : text.indexOf(PAYLOAD_FIELD);
    doc = cut > 0 ? JSON.parse(text.slice(0, cut) + '}') : JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return null;
  const d = doc as Record<string, unknown>;
  if (d.$$deleted === true && typeof d._id === 'string') return { record: null, deletedId: d._id };
  if ('$$indexCreated' in d || d._id === ANCHOR_ID) return { record: null, deletedId: null };
  if (
    typeof d._id !== 'string' ||
    typeof d.msg_id !== 'string' ||
    typeof d.timestamp !== 'number' ||
    typeof d.from_id !== 'string' ||
    (d.from_role !== 'boss' && d.from_role !== 'employee')
  ) {
    return null;
  }
  const queued = Array.isArray(d.queued) ? d.queued.filter((id): id is string => typeof id === 'string') : [];
  const targets = Array.isArray(d.targets) ? legacyTargets(d.targets) : outcomeTargets(d.delivered, d.failed, queued, d.settled);
  if (targets === null) return null;
  return {
    deletedId: null,
    record: {
      _id: d._id,
      msg_id: d.msg_id,
      timestamp: d.timestamp,
      from_id: d.from_id,
      from_role: d.from_role,
      targets,
      queued,
      payload_json: typeof d.payload_json === 'string' ? d.payload_json : d.payload === undefined ? 'null' : JSON.stringify(d.payload),
    },
  };
}

function recordOf(id: string, input: MessageRecordInput): MessageRecord {
  const { delivered, failed, queued, ...rest } = input;
  return { ...rest, _id: id, targets: outcomeTargets(delivered, failed, [...queued], null)!, queued: [...queued] };
}

/** Targets as the relay wrote them before records stored the ack's lists: one object each. */
function legacyTargets(list: unknown[]): TargetResult[] | null {
  const targets: TargetResult[] = [];
  for (const t of list) {
    if (typeof t !== 'object' || t === null || typeof (t as TargetResult).id !== 'string') return null;
    const target = t as TargetResult;
    targets.push({ id: target.id, role: target.role ?? null, status: target.status, reason: target.reason ?? null });
  }
  return targets;
}

function outcomeTargets(delivered: unknown, failed: unknown, queued: string[], settled: unknown): TargetResult[] | null {
  if (!Array.isArray(delivered) || !Array.isArray(failed)) return null;
  const later = typeof settled === 'object' && settled !== null ? (settled as Record<string, unknown>) : {};
  const targets: TargetResult[] = [];
  for (const id of delivered) {
    if (typeof id !== 'string') return null;
    targets.push({ id, role: roleFromId(id), status: 'delivered', reason: null });
  }
  for (const f of failed) {
    if (typeof f !== 'object' || f === null || typeof (f as DeliveryFailure).id !== 'string') return null;
    const { id, reason } = f as DeliveryFailure;
    targets.push({ id, role: reason === 'target_not_found' ? null : roleFromId(id), status: 'failed', reason });
  }
  for (const id of queued) {
    const status = later[id];
    targets.push({ id, role: roleFromId(id), status: status === 'delivered' || status === 'expired' ? status : 'queued', reason: null });
  }
  return targets;
}

/** What the record's first delivery_ack said: queued targets count as queued whatever happened since. */
export function firstAck(record: MessageRecord): AckBody {
  const queued = new Set(record.queued);
  return {
    msg_id: record.msg_id,
    delivered: record.targets.filter((t) => t.status === 'delivered' && !queued.has(t.id)).map((t) => t.id),
    failed: record.targets.flatMap((t) => (t.status === 'failed' && t.reason !== null ? [{ id: t.id, reason: t.reason }] : [])),
    queued: record.queued,
  };
}

const hasQueued = (record: MessageRecord) => record.targets.some((t) => t.status === 'queued');

function copyRange(from: string, to: string, start: number, end: number, flags: 'w' | 'a', mode: number): Promise<void> {
  if (end <= start && flags === 'a') return Promise.resolve();
  return new Promise<void>((resolve, reject) => {
    const sink = createWriteStream(to, { flags, mode });
    sink.on('error', reject);
    sink.on('finish', () => resolve());
    if (end <= start) {
      sink.end();
      return;
    }
    const source = createReadStream(from, { start, end: end - 1 });
    source.on('error', reject);
    source.pipe(sink);
  });
}

let idCounter = 0;
const idPrefix = randomBytes(6).toString('hex');

/** Unique across restarts (a random prefix per process) without a random draw per message. */
function newRecordId(): string {
  return idPrefix + (++idCounter).toString(36);
}

export class MessageLog {
  private readonly index = new MessageIndex();
  /** Records still waiting on a queued target, by _id, with their slot. */
  private readonly open = new Map<string, { slot: number; record: MessageRecord }>();
  private handle: fs.FileHandle | null = null;
  /** Bytes confirmed written. */
  private fileBytes = 0;
  /** Where the next line will sit: written, in-flight and pending bytes together. */
  private endOffset = 0;
  private pending: string[] = [];
  private pendingBytes = 0;
  private needsNewline = false;
  private writing: Promise<void> | null = null;
  private flushWaiters: (() => void)[] = [];
  private aboveHighWaterMark = false;
  private readonly drainListeners: (() => void)[] = [];
  private skippedLines = 0;
  /** Byte ranges of the lines skipped at load (newline excluded), to set aside once copied. */
  private damaged: { offset: number; length: number }[] = [];
  private loadedLines = 0;
  private lastId = '';
  /** The hash the next line chains to: the last line's, written or pending. */
  private chainHead = GENESIS_HASH;
  private maintenanceTimer: NodeJS.Timeout | null = null;
  private maintaining: Promise<void> | null = null;
  /** Set while a rewrite swaps the files: new lines wait in memory. */
  private holdWrites = false;
  private lingerTimer: NodeJS.Timeout | null = null;
  private closing = false;
  private closed = false;
  private readonly highWaterMark: number;
  private readonly fileMode: number;

  private constructor(private readonly options: MessageLogOptions) {
    this.highWaterMark = options.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
    this.fileMode = options.fileMode ?? DEFAULT_FILE_MODE;
  }

  static async open(options: MessageLogOptions): Promise<MessageLog> {
    const log = new MessageLog(options);
    await fs.mkdir(path.dirname(options.file), { recursive: true, mode: dirModeFor(log.fileMode) });
    await log.load();
    // Also tightens a file an older relay wrote 0644.
    await applyFileMode(options.file, log.fileMode, options.logger);
    if (log.damaged.length > 0) await log.setDamageAside();
    log.handle = await fs.open(options.file, 'a', log.fileMode);
    await log.maintain();
    const every = options.maintenanceIntervalMs ?? 600_000;
    log.maintenanceTimer = setInterval(() => void log.maintain(), every);
    log.maintenanceTimer.unref();
    return log;
  }

  private async load(): Promise<void> {
    let size = 0;
    try {
      size = (await fs.stat(this.options.file)).size;
    } catch {
      await fs.writeFile(this.options.file, '', { mode: this.fileMode });
      return;
    }
    let offset = 0;
    let lineNumber = 0;
    let carry: Buffer | null = null;
    const stream = createReadStream(this.options.file, { highWaterMark: 1024 * 1024 });
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      const buffer: Buffer = carry ? Buffer.concat([carry, chunk]) : chunk;
      let start = 0;
      for (let end = buffer.indexOf(NEWLINE, start); end >= 0; end = buffer.indexOf(NEWLINE, start)) {
        lineNumber++;
        this.loadLine(buffer.toString('utf8', start, end), offset, end - start + 1, lineNumber);
        offset += end - start + 1;
        start = end + 1;
      }
      carry = start < buffer.length ? buffer.subarray(start) : null;
    }
    if (carry && carry.length > 0) {
      // A last line without its newline was cut off mid-write: skip it, and start the next
      // append on a fresh line so the damage stays on its own line.
      lineNumber++;
      this.skip(lineNumber, 'truncated last line', offset, carry.length);
      offset += carry.length;
      this.needsNewline = true;
    }
    this.fileBytes = Math.max(offset, size);
    this.endOffset = this.fileBytes;
    this.loadedLines = lineNumber;
  }

  /**
   * Like the NeDB-held stores: keeps a copy of the damaged file as NAME.corrupt-<time>, then
   * overwrites the damaged lines in place, so the next start neither skips nor copies them
   * again. When the copy cannot be made the file is left as it is (the lines stay skipped).
   */
  private async setDamageAside(): Promise<void> {
    const { file, logger } = this.options;
    const backup = `${file}.corrupt-${Date.now()}`;
    try {
      await fs.copyFile(file, backup);
      await applyFileMode(backup, this.fileMode, logger);
      const handle = await fs.open(file, 'r+');
      try {
        for (const { offset, length } of this.damaged) {
          const filler = Buffer.alloc(length, ' ');
          if (length >= SET_ASIDE.length) filler.write(SET_ASIDE);
          await handle.write(filler, 0, length, offset);
        }
      } finally {
        await handle.close();
      }
      logger.warn('store_lines_skipped', { file, skipped_lines: this.skippedLines, total_lines: this.loadedLines, backup });
    } catch (error) {
      logger.error('message_log_backup_failed', { file, backup, skipped_lines: this.skippedLines, error: (error as Error).message });
    }
    this.damaged = [];
  }

  private loadLine(text: string, offset: number, length: number, lineNumber: number): void {
    const trimmed = text.trim();
    if (trimmed === '' || trimmed === SET_ASIDE) return;
    // The chain goes on from the last hash in the file, even a damaged line's: verify then
    // names the damage rather than a chain that silently skips it.
    const link = lineHash(text) ?? anchorOf(text);
    if (link !== null) this.chainHead = link;
    let parsed = parseLine(text, false);
    if (parsed === null) return this.skip(lineNumber, 'unreadable line', offset, length - 1);
    // Records waiting on a queued target are kept whole: their next version rewrites the payload.
    if (parsed.record !== null && hasQueued(parsed.record)) parsed = parseLine(text);
    if (parsed === null) return this.skip(lineNumber, 'unreadable line', offset, length - 1);
    if (parsed.deletedId !== null) {
      this.open.delete(parsed.deletedId);
      return;
    }
    const record = parsed.record;
    if (record === null) return;
    const known = this.open.get(record._id);
    if (known) {
      this.index.move(known.slot, offset, length);
      known.record = record;
      if (!hasQueued(record)) this.open.delete(record._id);
      return;
    }
    const slot = this.index.add(offset, length, record.timestamp, record.from_id, record.from_role, record.targets);
    if (hasQueued(record)) this.open.set(record._id, { slot, record });
  }

  private skip(lineNumber: number, reason: string, offset: number, length: number): void {
    this.skippedLines++;
    this.damaged.push({ offset, length });
    this.options.logger.warn('message_log_line_skipped', { file: this.options.file, line: lineNumber, reason });
  }

  /**
   * Appends a record and returns its slot (its place in the index, for ackAt); the record's
   * _id is lastRecordId. Check belowHighWaterMark afterwards.
   */
  append(input: MessageRecordInput, outcomeText: string = outcomeFields(input)): number {
    const id = newRecordId();
    this.lastId = id;
    const line = this.chain(serialise(id, input, outcomeText, ''));
    const slot = this.write(line, (offset, length) =>
      this.index.add(offset, length, input.timestamp, input.from_id, input.from_role, input.delivered, input.failed, input.queued),
    );
    if (input.queued.length > 0) this.open.set(id, { slot, record: recordOf(id, input) });
    const cap = this.options.maxMessages ?? 0;
    if (cap > 0 && this.index.size > cap * 1.1 && this.maintaining === null) void this.maintain();
    return slot;
  }

  /** The _id of the record append() wrote last. */
  get lastRecordId(): string {
    return this.lastId;
  }

  /** The ack a record's first delivery_ack carried, rebuilt from the record; null once pruned. */
  async ackAt(slot: number): Promise<AckBody | null> {
    await this.flush();
    const [record] = await this.readSlots([slot], false);
    return record ? firstAck(record) : null;
  }

  /** False while more than the high-water mark waits to be written: stop reading input until onDrain. */
  get belowHighWaterMark(): boolean {
    return !this.aboveHighWaterMark;
  }

  updateTarget(recordId: string, targetId: string, status: TargetStatus): void {
    const entry = this.open.get(recordId);
    if (!entry) {
      this.options.logger.debug('message_log_update_unknown', { record: recordId });
      return;
    }
    const targets = entry.record.targets.map((t) => (t.id === targetId ? { ...t, status } : t));
    entry.record = { ...entry.record, targets };
    if (!hasQueued(entry.record)) this.open.delete(recordId);
    this.write(this.chain(serialiseVersion(entry.record)), (offset, length) => {
      this.index.move(entry.slot, offset, length);
      return entry.slot;
    });
  }

  /** The record's line with its audit-chain hash, linked to the line before it in the file. */
  private chain(json: string): string {
    const { line, hash } = chainLine(this.chainHead, json);
    this.chainHead = hash;
    return `${line}\n`;
  }

  /** Buffers a line; `place` learns where it will sit in the file. */
  private write(line: string, place: (offset: number, length: number) => number): number {
    if (this.closed) throw new Error('message log is closed');
    if (this.needsNewline) {
      this.needsNewline = false;
      this.pending.push('\n');
      this.pendingBytes += 1;
      this.endOffset += 1;
    }
    const length = Buffer.byteLength(line);
    const slot = place(this.endOffset, length);
    this.pending.push(line);
    this.pendingBytes += length;
    this.endOffset += length;
    if (this.pendingBytes > this.highWaterMark) this.aboveHighWaterMark = true;
    if (this.writing === null && !this.holdWrites) {
      if (this.pendingBytes >= LINGER_BYTES) this.startWriting();
      else this.lingerTimer ??= setTimeout(this.startWriting, LINGER_MS);
    }
    return slot;
  }

  /** Group commit: one write for everything pending, repeated while more arrives. */
  /** Writes what is pending now (unless a write or a file swap is under way). */
  private readonly startWriting = (): void => {
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    if (this.writing === null && !this.holdWrites && this.pending.length > 0) this.writing = this.drainPending();
  };

  private async drainPending(): Promise<void> {
    try {
      while (this.pending.length > 0 && this.handle !== null && !this.holdWrites) {
        const batch = Buffer.from(this.pending.join(''));
        this.pending = [];
        this.pendingBytes = 0;
        await this.writeFully(batch);
        this.fileBytes += batch.length;
        if (this.aboveHighWaterMark && this.pendingBytes <= this.highWaterMark / 2) {
          this.aboveHighWaterMark = false;
          for (const listener of this.drainListeners) listener();
        }
      }
    } finally {
      this.writing = null;
      const waiters = this.flushWaiters;
      this.flushWaiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  /**
   * Writes the whole batch, retrying after a failure (a full disk, say): the index already
   * points at these offsets, so a batch may not be skipped. Meanwhile new lines wait in memory
   * and the high-water mark pauses the senders. Only close() gives up, after a few tries.
   */
  private async writeFully(batch: Buffer): Promise<void> {
    let written = 0;
    for (let failures = 0; written < batch.length; ) {
      try {
        written += (await this.handle!.write(batch, written, batch.length - written)).bytesWritten;
        if (written === batch.length && this.options.fsync) await this.handle!.sync();
        failures = 0;
      } catch (error) {
        failures++;
        this.options.logger.error('message_log_write_failed', { bytes: batch.length - written, attempt: failures, error: (error as Error).message });
        if (this.closing && failures >= 3) return;
        await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 100 * 2 ** failures)));
      }
    }
  }

  onDrain(listener: () => void): void {
    this.drainListeners.push(listener);
  }

  async flush(): Promise<void> {
    if (this.holdWrites && this.maintaining) await this.maintaining;
    this.startWriting();
    if (this.writing === null) return;
    await new Promise<void>((resolve) => this.flushWaiters.push(resolve));
  }

  async query(query: CommunicationQuery): Promise<{ total: number; edges: CommunicationEdge[] }> {
    await this.flush();
    const { total, hits } = this.index.query(query);
    const records = await this.readSlots(hits.map((hit) => hit.slot));
    const edges: CommunicationEdge[] = [];
    hits.forEach((hit, i) => {
      const record = records[i];
      const target = record?.targets[hit.target];
      if (record && target) edges.push({ record, target });
    });
    return { total, edges };
  }

  /** Records with timestamp >= since with their slots, oldest first, at most the newest `limit`; payloads are not read. */
  async recordsSince(since: number, limit = Infinity): Promise<{ slot: number; record: MessageRecord }[]> {
    await this.flush();
    const slots = this.index.slotsSince(since, limit);
    const records = await this.readSlots(slots, false);
    const out: { slot: number; record: MessageRecord }[] = [];
    records.forEach((record, i) => {
      if (record) out.push({ slot: slots[i]!, record });
    });
    return out;
  }

  /** Reads the records at these slots; neighbouring lines are read together in one call. */
  private async readSlots(slots: number[], withPayload = true): Promise<(MessageRecord | null)[]> {
    if (slots.length === 0) return [];
    const where = slots.map((slot) => this.index.location(slot));
    const order = slots.map((_, i) => i).filter((i) => where[i] !== null);
    order.sort((a, b) => where[a]!.offset - where[b]!.offset);
    const out: (MessageRecord | null)[] = new Array<MessageRecord | null>(slots.length).fill(null);
    const reader = await fs.open(this.options.file, 'r');
    try {
      for (let first = 0; first < order.length; ) {
        // A run of lines that follow each other in the file, up to 16 MiB per read.
        let last = first;
        const start = where[order[first]!]!.offset;
        let end = start + where[order[first]!]!.length;
        while (last + 1 < order.length && where[order[last + 1]!]!.offset === end && end - start < 16 * 1024 * 1024) {
          last++;
          end += where[order[last]!]!.length;
        }
        const buffer = Buffer.alloc(end - start);
        await reader.read(buffer, 0, buffer.length, start);
        for (let k = first; k <= last; k++) {
          const at = where[order[k]!]!;
          out[order[k]!] = parseLine(buffer.toString('utf8', at.offset - start, at.offset - start + at.length), withPayload)?.record ?? null;
        }
        first = last + 1;
      }
      return out;
    } finally {
      await reader.close();
    }
  }

  stats(): MessageLogStats {
    return { records: this.index.size, fileBytes: this.fileBytes, pendingBytes: this.pendingBytes, skippedLines: this.skippedLines };
  }

  /** Prunes by age and count: the kept tail of the file is copied to a new file that replaces it. */
  private maintain(): Promise<void> {
    if (this.maintaining || this.closed) return this.maintaining ?? Promise.resolve();
    const retention = this.options.retentionMs ?? 0;
    const keepFrom = this.index.firstKept(retention > 0 ? Date.now() - retention : -Infinity, this.options.maxMessages ?? 0);
    if (keepFrom === this.index.firstSlot) return Promise.resolve();
    this.maintaining = this.prune(keepFrom).finally(() => {
      this.maintaining = null;
      this.startWriting();
    });
    return this.maintaining;
  }

  /**
   * Copies the kept tail [cut, end) to a new file while appends go on, then holds new writes
   * only to copy what arrived meanwhile and swap the files. The new file starts with the audit
   * chain's anchor (the hash of the last line cut off), so the chain still verifies.
   */
  private async prune(keepFrom: number): Promise<void> {
    if (this.writing) await this.writing;
    const cut = keepFrom < this.index.nextSlot ? this.index.minOffsetFrom(keepFrom) : this.fileBytes;
    const temp = `${this.options.file}.prune-${process.pid}`;
    try {
      const anchor = await this.linkBefore(cut);
      const header = anchor === null ? '' : `${anchorLine(anchor)}\n`;
      const shift = cut - header.length;
      const copiedTo = this.fileBytes;
      await fs.writeFile(temp, header, { mode: this.fileMode });
      await copyRange(this.options.file, temp, cut, copiedTo, 'a', this.fileMode);
      // A temp file left by a crash keeps its old mode when opened again.
      await applyFileMode(temp, this.fileMode, this.options.logger);
      this.holdWrites = true;
      if (this.writing) await this.writing;
      await copyRange(this.options.file, temp, copiedTo, this.fileBytes, 'a', this.fileMode);
      await this.handle?.close();
      this.handle = null;
      await fs.rename(temp, this.options.file);
      const dropped = keepFrom - this.index.firstSlot;
      this.index.dropBefore(keepFrom, shift);
      this.fileBytes -= shift;
      this.endOffset -= shift;
      for (const [id, entry] of this.open) if (entry.slot < keepFrom) this.open.delete(id);
      // The anchor in the log too: a copy outside the file to compare with when in doubt.
      this.options.logger.info('message_log_pruned', { records: dropped, bytes: cut, chain_anchor: anchor });
    } catch (error) {
      this.options.logger.error('message_log_prune_failed', { error: (error as Error).message });
      await fs.rm(temp, { force: true });
    } finally {
      this.handle ??= await fs.open(this.options.file, 'a', this.fileMode);
      this.holdWrites = false;
    }
  }

  /**
   * The chain's value just before `cut` (a line start): the hash ending the line before it, read
   * from its last bytes; when that line has none (set aside, or older than the audit trail), the
   * last link found reading the file up to `cut`. Null when there is none.
   */
  private async linkBefore(cut: number): Promise<string | null> {
    if (cut <= 0) return null;
    const reader = await fs.open(this.options.file, 'r');
    try {
      const length = Math.min(cut - 1, LINK_SUFFIX_LENGTH + 1);
      const tail = Buffer.alloc(length);
      await reader.read(tail, 0, length, cut - 1 - length);
      const hash = lineHash(tail.toString('latin1'));
      if (hash !== null) return hash;
    } finally {
      await reader.close();
    }
    let link: string | null = null;
    let carry = '';
    for await (const chunk of createReadStream(this.options.file, { start: 0, end: cut - 1, encoding: 'utf8', highWaterMark: 1024 * 1024 })) {
      const lines = (carry + (chunk as string)).split('\n');
      carry = lines.pop() ?? '';
      for (const text of lines) link = lineHash(text) ?? anchorOf(text) ?? link;
    }
    return link;
  }

  async close(): Promise<void> {
    this.closing = true;
    if (this.maintenanceTimer) clearInterval(this.maintenanceTimer);
    if (this.maintaining) await this.maintaining;
    await this.flush();
    this.closed = true;
    await this.handle?.close();
    this.handle = null;
  }
}
