// The audit trail: every line of messages.db and every event of connections.db carries a
// `hash` chained to the one before it, hash = SHA-256(previous hash as 64 hex chars ‖ the
// record's canonical JSON). Changing, removing or reordering a record breaks the link after it.
//
// - messages.db is chained in file order, one link per line (a record's later versions are
//   links too). Its canonical JSON is the line as the relay wrote it without the trailing
//   `,"hash":"…"` field: the relay serialises records in one fixed form (fixed field order, no
//   spaces), so verifying needs no JSON parse and a million lines take a few seconds.
// - connections.db is a NeDB datafile that compaction rewrites in any order, so its events are
//   chained by their `seq` (1, 2, 3, … in the order recorded) and verified in seq order; the
//   canonical JSON is the document with its keys sorted and without `hash`.
//
// Pruning keeps the chain verifiable by recording the anchor, the hash just before the first
// kept link: a header line {"_id":"audit-chain-anchor","anchor":…} at the top of messages.db,
// a document {"_id":"audit-chain-anchor","anchor":…,"anchor_seq":n} in connections.db.
// Records written before the audit trail existed have no hash: they are counted as unchained,
// and the chain starts at the first record with one (from the genesis hash, 64 zeros).

import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';

export const GENESIS_HASH = '0'.repeat(64);
export const ANCHOR_ID = 'audit-chain-anchor';
export const HASH_FIELD = 'hash';
/** What ends every chained messages.db line: `,"hash":"<64 hex>"}`. */
const SUFFIX_HEAD = `,"${HASH_FIELD}":"`;
export const LINK_SUFFIX_LENGTH = SUFFIX_HEAD.length + 64 + 2;
const HEX64 = /^[0-9a-f]{64}$/;
const NEWLINE = 0x0a;

/** JSON with object keys sorted (recursively), no spaces, undefined fields left out. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) return `[${value.map((item) => (item === undefined ? 'null' : canonicalJson(item))).join(',')}]`;
  const record = value as Record<string, unknown>;
  const parts: string[] = [];
  for (const key of Object.keys(record).sort()) {
    if (record[key] === undefined) continue;
    parts.push(`${JSON.stringify(key)}:${canonicalJson(record[key])}`);
  }
  return `{${parts.join(',')}}`;
}

export function linkHash(previous: string, canonical: string | Buffer): string {
  return createHash('sha256').update(previous).update(canonical).digest('hex');
}

/** A messages.db line (the JSON text of a record, no newline) with its hash field added. */
export function chainLine(previous: string, json: string): { line: string; hash: string } {
  const hash = linkHash(previous, json);
  return { line: `${json.slice(0, -1)}${SUFFIX_HEAD}${hash}"}`, hash };
}

/** The hash a messages.db line carries, or null when it has none. */
export function lineHash(text: string): string | null {
  const at = text.length - LINK_SUFFIX_LENGTH;
  if (at < 1 || !text.startsWith(SUFFIX_HEAD, at) || !text.endsWith('"}')) return null;
  const hash = text.slice(at + SUFFIX_HEAD.length, text.length - 2);
  return HEX64.test(hash) ? hash : null;
}

export function anchorLine(anchor: string): string {
  return `{"_id":"${ANCHOR_ID}","anchor":"${anchor}"}`;
}

/** The anchor a messages.db header line names, or null when the line is not one. */
export function anchorOf(text: string): string | null {
  if (!text.startsWith(`{"_id":"${ANCHOR_ID}"`)) return null;
  try {
    const doc = JSON.parse(text) as { anchor?: unknown };
    return typeof doc.anchor === 'string' && HEX64.test(doc.anchor) ? doc.anchor : null;
  } catch {
    return null;
  }
}

export interface BrokenLink {
  file: string;
  /** 1-based line in the file. */
  line: number;
  record_id: string | null;
  /** connections.db only: the event's seq. */
  seq?: number;
  reason: string;
}

export interface ChainReport {
  file: string;
  status: 'intact' | 'broken' | 'absent';
  /** Links whose hash was checked and found right. */
  checked: number;
  /** Records written before the audit trail (no hash), before the chain starts. */
  unchained: number;
  /** Line (messages.db) or seq (connections.db) where the chain starts; null without one. */
  chain_start: number | null;
  /** The hash the chain starts from: the genesis hash, or the anchor pruning recorded. */
  anchor: string | null;
  /** The last link's hash: note it down to detect a rewrite of the whole chain later. */
  head: string | null;
  broken: BrokenLink | null;
  /** A last line cut off mid-write (a crash, or a write under way): not a link yet. */
  torn_last_line: boolean;
}

export interface AuditReport {
  intact: boolean;
  checked: number;
  files: ChainReport[];
  first_broken: BrokenLink | null;
}

/**
 * Calls `onLine` for every complete line of the file (its bytes without the newline). Reads of
 * 1 MiB: inside the relay (the admin route) the event loop gets a turn every few milliseconds.
 */
async function eachLine(file: string, onLine: (line: Buffer, number: number) => boolean): Promise<{ torn: boolean }> {
  let carry: Buffer | null = null;
  let number = 0;
  const stream = createReadStream(file, { highWaterMark: 1024 * 1024 });
  try {
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      const buffer: Buffer = carry ? Buffer.concat([carry, chunk]) : chunk;
      let start = 0;
      for (let end = buffer.indexOf(NEWLINE, start); end >= 0; end = buffer.indexOf(NEWLINE, start)) {
        if (!onLine(buffer.subarray(start, end), ++number)) return { torn: false };
        start = end + 1;
      }
      carry = start < buffer.length ? Buffer.from(buffer.subarray(start)) : null;
    }
  } finally {
    stream.destroy();
  }
  return { torn: carry !== null && carry.toString('utf8').trim() !== '' };
}

function recordIdOf(text: string): string | null {
  const match = /^\{"_id":"((?:[^"\\]|\\.)*)"/.exec(text);
  return match ? match[1]! : null;
}

const SPACE = 0x20;
const OPEN = 0x7b;
const CLOSE = 0x7d;

/** A line the relay and NeDB pass over: blank, or `{}` padded with spaces (a damaged line set aside). */
function isFiller(line: Buffer): boolean {
  let at = 0;
  while (at < line.length && line[at] === SPACE) at++;
  if (at === line.length) return true;
  if (line[at] !== OPEN || line[at + 1] !== CLOSE) return false;
  for (at += 2; at < line.length; at++) if (line[at] !== SPACE && line[at] !== 0x0d) return false;
  return true;
}

export async function verifyMessagesFile(file: string): Promise<ChainReport> {
  const name = path.basename(file);
  const report: ChainReport = { file: name, status: 'intact', checked: 0, unchained: 0, chain_start: null, anchor: null, head: null, broken: null, torn_last_line: false };
  let previous: string | null = null;
  let pendingAnchor: string | null = null;
  const suffixHead = Buffer.from(SUFFIX_HEAD);
  const close = Buffer.from('}');
  const fail = (number: number, text: string, reason: string) => {
    report.status = 'broken';
    report.broken = { file: name, line: number, record_id: recordIdOf(text), reason };
    return false;
  };
  try {
    await fs.access(file);
  } catch {
    return { ...report, status: 'absent' };
  }
  const { torn } = await eachLine(file, (line, number) => {
    if (isFiller(line)) return true;
    const at = line.length - LINK_SUFFIX_LENGTH;
    const chained = at >= 1 && line.compare(suffixHead, 0, suffixHead.length, at, at + suffixHead.length) === 0 && line[line.length - 1] === CLOSE;
    if (!chained) {
      const text = line.toString('utf8');
      const anchor = anchorOf(text);
      if (anchor !== null) {
        if (previous !== null) return fail(number, text, 'an anchor line inside the chain: lines were moved or inserted here');
        pendingAnchor = anchor;
        return true;
      }
      if (previous !== null || pendingAnchor !== null) {
        return fail(number, text, 'this record has no hash inside the chain: it was edited, inserted, or written by a relay without the audit trail');
      }
      report.unchained++;
      return true;
    }
    const stored = line.toString('latin1', at + suffixHead.length, line.length - 2);
    if (previous === null) {
      previous = pendingAnchor ?? GENESIS_HASH;
      report.anchor = previous;
      report.chain_start = number;
    }
    const computed = createHash('sha256').update(previous).update(line.subarray(0, at)).update(close).digest('hex');
    if (computed !== stored) {
      const text = line.toString('utf8');
      const reason =
        number === report.chain_start && pendingAnchor === null && report.unchained === 0
          ? 'the first record does not start from the genesis hash: records before it were removed, or this record was changed'
          : 'hash does not match: this record was changed, or the record before it was removed or changed';
      return fail(number, text, reason);
    }
    previous = stored;
    report.checked++;
    return true;
  });
  report.head = previous;
  report.torn_last_line = torn;
  if (report.status === 'intact' && previous === null && pendingAnchor !== null) report.anchor = pendingAnchor;
  return report;
}

interface EventVersion {
  doc: Record<string, unknown>;
  line: number;
}

export async function verifyConnectionsFile(file: string): Promise<ChainReport> {
  const name = path.basename(file);
  const report: ChainReport = { file: name, status: 'intact', checked: 0, unchained: 0, chain_start: null, anchor: null, head: null, broken: null, torn_last_line: false };
  try {
    await fs.access(file);
  } catch {
    return { ...report, status: 'absent' };
  }
  // NeDB's semantics: a later line with the same _id replaces the earlier one; $$deleted removes it.
  const docs = new Map<string, EventVersion>();
  let unreadable: BrokenLink | null = null;
  const { torn } = await eachLine(file, (line, number) => {
    if (isFiller(line)) return true;
    const text = line.toString('utf8');
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      unreadable ??= { file: name, line: number, record_id: recordIdOf(text), reason: 'this line is not JSON: it was damaged or edited' };
      return true;
    }
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return true;
    const d = doc as Record<string, unknown>;
    if ('$$indexCreated' in d || typeof d._id !== 'string') return true;
    if (d.$$deleted === true) docs.delete(d._id);
    else docs.set(d._id, { doc: d, line: number });
    return true;
  });
  report.torn_last_line = torn;
  const anchorDoc = docs.get(ANCHOR_ID)?.doc;
  docs.delete(ANCHOR_ID);
  const anchorSeq = typeof anchorDoc?.anchor_seq === 'number' ? anchorDoc.anchor_seq : 0;
  const anchor = typeof anchorDoc?.anchor === 'string' ? anchorDoc.anchor : GENESIS_HASH;
  const chained: EventVersion[] = [];
  for (const version of docs.values()) {
    if (typeof version.doc.seq === 'number' && typeof version.doc[HASH_FIELD] === 'string') {
      // Events at or below the anchor are being pruned (a prune stopped midway): not links any more.
      if (version.doc.seq > anchorSeq) chained.push(version);
    } else report.unchained++;
  }
  chained.sort((a, b) => (a.doc.seq as number) - (b.doc.seq as number));
  let previous = anchor;
  let expected = anchorSeq + 1;
  if (chained.length > 0) {
    report.anchor = anchor;
    report.chain_start = chained[0]!.doc.seq as number;
  }
  const fail = (version: EventVersion, reason: string) => {
    report.status = 'broken';
    report.broken = { file: name, line: version.line, record_id: version.doc._id as string, seq: version.doc.seq as number, reason };
  };
  for (const version of chained) {
    const { doc } = version;
    const seq = doc.seq as number;
    if (seq !== expected) {
      fail(version, seq < expected ? `seq ${seq} appears twice: an event was copied or replaced` : `events ${expected}${seq - 1 > expected ? `-${seq - 1}` : ''} are missing before this one: removed from the file`);
      break;
    }
    const { [HASH_FIELD]: stored, ...rest } = doc;
    if (linkHash(previous, canonicalJson(rest)) !== stored) {
      fail(version, 'hash does not match: this event was changed');
      break;
    }
    previous = stored as string;
    expected++;
    report.checked++;
  }
  if (report.status === 'intact' && unreadable !== null) {
    report.status = 'broken';
    report.broken = unreadable;
  }
  report.head = chained.length > 0 ? previous : null;
  return report;
}

/** Verifies every chained file of a data dir; the first broken link is the first found, messages.db first. */
export async function verifyDataDir(dataDir: string): Promise<AuditReport> {
  const files = [await verifyMessagesFile(path.join(dataDir, 'messages.db')), await verifyConnectionsFile(path.join(dataDir, 'connections.db'))];
  const firstBroken = files.find((f) => f.broken !== null)?.broken ?? null;
  return { intact: firstBroken === null, checked: files.reduce((sum, f) => sum + f.checked, 0), files, first_broken: firstBroken };
}

/** One line for people: "intact: …" or "broken: file line N, record X: reason". */
export function describeReport(report: AuditReport): string {
  const counts = report.files
    .filter((f) => f.status !== 'absent')
    .map((f) => `${f.file} ${f.checked}${f.unchained > 0 ? ` (+${f.unchained} unchained, before the chain starts)` : ''}`)
    .join(', ');
  if (report.first_broken === null) return `intact: ${report.checked} records checked${counts ? ` (${counts})` : ''}`;
  const b = report.first_broken;
  return `broken: ${b.file} line ${b.line}, record ${b.record_id ?? '(no id)'}${b.seq !== undefined ? ` (seq ${b.seq})` : ''}: ${b.reason}`;
}
