// messages.db in NeDB's line format (see lib/message-log.ts): writing a large one for the
// restart and verify scenarios (hash-chained as the relay writes it), and counting what a run
// left in one.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import readline from 'node:readline';
import { chainLine, GENESIS_HASH } from '../lib/audit-chain';

const ID_ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

/** A 16-character id like NeDB's. */
function nedbId(): string {
  const bytes = randomBytes(16);
  let id = '';
  for (const byte of bytes) id += ID_ALPHABET[byte % ID_ALPHABET.length];
  return id;
}

function uuidLike(n: number): string {
  const hex = n.toString(16).padStart(12, '0');
  return `00000000-0000-4000-8000-${hex}`;
}

/** One record: mostly boss -> employee, every tenth employee -> boss, all delivered. */
function recordLine(index: number, timestamp: number): string {
  const boss = `boss-${uuidLike(index % 5)}`;
  const employee = `employee-${uuidLike(1000 + (index % 200))}`;
  const fromBoss = index % 10 !== 0;
  const record = {
    _id: nedbId(),
    msg_id: uuidLike(10_000_000 + index),
    timestamp,
    from_id: fromBoss ? boss : employee,
    from_role: fromBoss ? 'boss' : 'employee',
    delivered: [fromBoss ? employee : boss],
    failed: [],
    queued: [],
    // As the relay writes it: a payload without "." or "$" in its JSON text is stored as it is.
    payload: { task: 'summarise', seq: index, body: 'report on item ' + index },
  };
  return JSON.stringify(record);
}

/** Writes `count` records with timestamps spread over the last hour (inside any retention). */
export async function writeMessagesDb(file: string, count: number): Promise<number> {
  const out = fs.createWriteStream(file);
  const end = Date.now() - 1000;
  const start = end - 3_600_000;
  const step = (end - start) / Math.max(1, count);
  const chunkLines = 5000;
  let previous = GENESIS_HASH;
  for (let index = 0; index < count; ) {
    const lines: string[] = [];
    for (let n = 0; n < chunkLines && index < count; n++, index++) {
      const link = chainLine(previous, recordLine(index, Math.floor(start + index * step)));
      previous = link.hash;
      lines.push(link.line);
    }
    if (!out.write(lines.join('\n') + '\n')) await new Promise<void>((resolve) => out.once('drain', resolve));
  }
  await new Promise<void>((resolve, reject) => out.end((error?: Error | null) => (error ? reject(error) : resolve())));
  return fs.statSync(file).size;
}

export interface LogCount {
  lines: number;
  uniqueIds: number;
  /** Distinct msg_ids starting with the run's prefix. */
  runMessages: number;
  unparsable: number;
}

export async function countMessagesDb(file: string, msgIdPrefix: string): Promise<LogCount> {
  const ids = new Set<string>();
  const runIds = new Set<string>();
  let lines = 0;
  let unparsable = 0;
  if (!fs.existsSync(file)) return { lines: 0, uniqueIds: 0, runMessages: 0, unparsable: 0 };
  const reader = readline.createInterface({ input: fs.createReadStream(file), crlfDelay: Infinity });
  for await (const line of reader) {
    if (line === '') continue;
    lines++;
    let doc: Record<string, unknown>;
    try {
      doc = JSON.parse(line) as Record<string, unknown>;
    } catch {
      unparsable++;
      continue;
    }
    if (typeof doc._id === 'string' && doc.$$deleted !== true) ids.add(doc._id);
    if (typeof doc.msg_id === 'string' && doc.msg_id.startsWith(msgIdPrefix)) runIds.add(doc.msg_id);
  }
  return { lines, uniqueIds: ids.size, runMessages: runIds.size, unparsable };
}
