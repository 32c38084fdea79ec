// messages.db: the append-only log, its index and queries, versions, damage tolerance,
// pruning, backpressure and that close() writes everything; and that NeDB still reads it.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import Datastore from '@seald-io/nedb';
import { createLogger } from '../lib/logger';
import { MessageLog, type MessageRecordInput, type TargetResult } from '../lib/message-log';
import { makeTempDir } from './support';

let dir: string;
before(async () => {
  dir = await makeTempDir('mimiclaw-log-');
});
after(() => fs.rm(dir, { recursive: true, force: true }));

const silent = createLogger('silent');
let files = 0;
const newFile = () => path.join(dir, `messages-${++files}.db`);

function message(i: number, from: string, to: TargetResult[], timestamp = 1_700_000_000_000 + i): MessageRecordInput {
  return {
    msg_id: `m-${i}`,
    timestamp,
    from_id: from,
    from_role: from.startsWith('boss-') ? 'boss' : 'employee',
    delivered: to.filter((t) => t.status === 'delivered').map((t) => t.id),
    failed: to.flatMap((t) => (t.status === 'failed' && t.reason !== null ? [{ id: t.id, reason: t.reason }] : [])),
    queued: to.filter((t) => t.status === 'queued').map((t) => t.id),
    payload_json: JSON.stringify({ i, 'odd.key': '$x' }),
  };
}
const to = (id: string, status: TargetResult['status'] = 'delivered'): TargetResult => ({
  id,
  role: id.startsWith('boss-') ? 'boss' : 'employee',
  status,
  reason: status === 'failed' ? 'target_offline' : null,
});

test('append, reopen and query newest first with filters and paging', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent });
  for (let i = 0; i < 10; i++) log.append(message(i, 'boss-a', [to(i % 2 === 0 ? 'employee-x' : 'employee-y')]));
  log.append(message(10, 'employee-x', [to('boss-a')]));
  log.append(message(11, 'employee-x', [to('employee-y')]));
  log.append(message(12, 'boss-b', [to('employee-x', 'failed'), to('employee-y'), to('boss-a')]));
  await log.close();

  const reopened = await MessageLog.open({ file, logger: silent });
  assert.equal(reopened.stats().records, 13);
  const all = await reopened.query({ offset: 0, limit: 100 });
  assert.equal(all.total, 13, 'employee-employee and boss-boss pairs are not edges');
  // Within a record, targets come as its ack lists them: delivered, failed, queued.
  assert.deepEqual(all.edges.slice(0, 3).map((e) => [e.record.msg_id, e.target.id]), [['m-12', 'employee-y'], ['m-12', 'employee-x'], ['m-10', 'boss-a']]);
  assert.deepEqual(JSON.parse(all.edges[2]!.record.payload_json), { i: 10, 'odd.key': '$x' });
  assert.deepEqual(all.edges.slice(0, 2).map((e) => [e.target.status, e.target.reason, e.target.role]), [['delivered', null, 'employee'], ['failed', 'target_offline', 'employee']]);
  assert.equal((await reopened.query({ bossId: 'boss-b', offset: 0, limit: 10 })).total, 2);
  assert.equal((await reopened.query({ employeeId: 'employee-y', offset: 0, limit: 10 })).total, 6);
  assert.equal((await reopened.query({ employeeIds: new Set(['employee-x']), bossId: 'boss-a', offset: 0, limit: 10 })).total, 6);
  assert.equal((await reopened.query({ bossId: 'boss-none', offset: 0, limit: 10 })).total, 0);
  const window = await reopened.query({ since: 1_700_000_000_003, until: 1_700_000_000_005, offset: 0, limit: 10 });
  assert.deepEqual(window.edges.map((e) => e.record.msg_id), ['m-5', 'm-4', 'm-3']);
  const page = await reopened.query({ offset: 2, limit: 3 });
  assert.equal(page.total, 13);
  assert.deepEqual(page.edges.map((e) => e.record.msg_id), ['m-10', 'm-9', 'm-8']);
  const recent = await reopened.recordsSince(1_700_000_000_011);
  assert.deepEqual(recent.map((r) => r.record.msg_id), ['m-11', 'm-12']);
  const newestTwo = await reopened.recordsSince(0, 2);
  assert.deepEqual(newestTwo.map((r) => r.record.msg_id), ['m-11', 'm-12']);
  assert.deepEqual(await reopened.ackAt(newestTwo[1]!.slot), {
    msg_id: 'm-12',
    delivered: ['employee-y', 'boss-a'],
    failed: [{ id: 'employee-x', reason: 'target_offline' }],
    queued: [],
  });
  await reopened.close();
});

test('a queued target updated later keeps its place and survives reopen; NeDB reads the latest version', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent });
  const slot = log.append(message(1, 'boss-a', [to('employee-x', 'queued'), to('employee-y')]));
  const recordId = log.lastRecordId;
  log.append({ ...message(2, 'boss-a', [to('employee-y')]), payload_json: '{"plain":[1,2]}' });
  log.updateTarget(recordId, 'employee-x', 'delivered');
  assert.deepEqual(await log.ackAt(slot), { msg_id: 'm-1', delivered: ['employee-y'], failed: [], queued: ['employee-x'] }, 'the first ack, not the current state');
  const live = await log.query({ employeeId: 'employee-x', offset: 0, limit: 5 });
  assert.equal(live.edges[0]!.target.status, 'delivered');
  await log.close();

  const reopened = await MessageLog.open({ file, logger: silent });
  const all = await reopened.query({ offset: 0, limit: 5 });
  assert.deepEqual(all.edges.map((e) => [e.record.msg_id, e.target.id, e.target.status]), [
    ['m-2', 'employee-y', 'delivered'],
    ['m-1', 'employee-y', 'delivered'],
    ['m-1', 'employee-x', 'delivered'],
  ]);
  assert.deepEqual(all.edges[1]!.record.queued, ['employee-x'], 'queued keeps what the first ack said');
  await reopened.close();

  const nedb = new Datastore<Record<string, unknown>>({ filename: file });
  await nedb.loadDatabaseAsync();
  const docs = await nedb.findAsync({});
  assert.equal(docs.length, 2);
  const first = docs.find((d) => d.msg_id === 'm-1')!;
  assert.deepEqual([first.delivered, first.failed, first.queued, first.settled], [['employee-y'], [], ['employee-x'], { 'employee-x': 'delivered' }]);
  assert.deepEqual(JSON.parse(String(first.payload_json)), { i: 1, 'odd.key': '$x' }, 'keys NeDB refuses are kept as JSON text');
  assert.deepEqual(docs.find((d) => d.msg_id === 'm-2')!.payload, { plain: [1, 2] }, 'other payloads are stored as they are');
});

test('records written with one object per target (the earlier line format) still load, query and answer acks', async () => {
  const file = newFile();
  const legacy = (id: string, msgId: string, targets: object[], queued: string[]) =>
    JSON.stringify({ _id: id, msg_id: msgId, timestamp: 1_700_000_000_000, from_id: 'boss-a', from_role: 'boss', targets, queued, payload: { n: 1 } });
  await fs.writeFile(
    file,
    [
      legacy('r1', 'old-1', [
        { id: 'employee-x', role: 'employee', status: 'failed', reason: 'target_offline' },
        { id: 'employee-y', role: 'employee', status: 'delivered', reason: null },
      ], []),
      legacy('r2', 'old-2', [{ id: 'employee-x', role: 'employee', status: 'queued', reason: null }], ['employee-x']),
      legacy('r2', 'old-2', [{ id: 'employee-x', role: 'employee', status: 'expired', reason: null }], ['employee-x']),
    ].join('\n') + '\n',
  );
  const log = await MessageLog.open({ file, logger: silent });
  const all = await log.query({ offset: 0, limit: 10 });
  assert.deepEqual(all.edges.map((e) => [e.record.msg_id, e.target.id, e.target.status]), [
    ['old-2', 'employee-x', 'expired'],
    ['old-1', 'employee-x', 'failed'],
    ['old-1', 'employee-y', 'delivered'],
  ]);
  const [first, second] = await log.recordsSince(0);
  assert.deepEqual(await log.ackAt(first!.slot), { msg_id: 'old-1', delivered: ['employee-y'], failed: [{ id: 'employee-x', reason: 'target_offline' }], queued: [] });
  assert.deepEqual(await log.ackAt(second!.slot), { msg_id: 'old-2', delivered: [], failed: [], queued: ['employee-x'] });
  log.append(message(3, 'boss-a', [to('employee-y')]));
  await log.close();
  const reopened = await MessageLog.open({ file, logger: silent });
  assert.equal((await reopened.query({ employeeId: 'employee-y', offset: 0, limit: 10 })).total, 2, 'old and new lines side by side');
  await reopened.close();
});

test('a truncated last line and a corrupt middle line are skipped; the next append is intact', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent });
  for (let i = 0; i < 3; i++) log.append(message(i, 'boss-a', [to('employee-x')]));
  await log.close();
  const lines = (await fs.readFile(file, 'utf8')).split('\n');
  lines[1] = '{"_id":"broken", "msg_id": oops';
  await fs.writeFile(file, lines.join('\n') + '{"_id":"cut","msg_id":"m-cut","timest');

  const warnings: string[] = [];
  const logger = createLogger('warn', (line) => warnings.push(line));
  const reopened = await MessageLog.open({ file, logger });
  assert.equal(reopened.stats().skippedLines, 2);
  assert.equal(warnings.filter((w) => w.includes('message_log_line_skipped')).length, 2);
  assert.ok(warnings.every((w) => !w.includes('oops') && !w.includes('m-cut')), 'never logs line content');
  reopened.append(message(9, 'boss-a', [to('employee-x')]));
  await reopened.close();

  const again = await MessageLog.open({ file, logger: silent });
  const all = await again.query({ offset: 0, limit: 10 });
  assert.deepEqual(all.edges.map((e) => e.record.msg_id), ['m-9', 'm-2', 'm-0']);
  await again.close();
});

test('a damaged messages.db is copied to messages.db.corrupt-<time> once, like the other stores', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent });
  for (let i = 0; i < 3; i++) log.append(message(i, 'boss-a', [to('employee-x')]));
  await log.close();
  const lines = (await fs.readFile(file, 'utf8')).split('\n');
  lines[1] = '{"_id":"broken", "msg_id": oops';
  const damaged = lines.join('\n') + '{"_id":"cut","msg_id":"m-cut","timest';
  await fs.writeFile(file, damaged);
  const backups = async () => (await fs.readdir(dir)).filter((name) => name.startsWith(`${path.basename(file)}.corrupt-`));

  const warnings: Record<string, unknown>[] = [];
  const logger = createLogger('warn', (line) => warnings.push(JSON.parse(line) as Record<string, unknown>));
  const reopened = await MessageLog.open({ file, logger });
  const [backup] = await backups();
  assert.ok(backup, 'a copy of the damaged file is kept');
  assert.equal(await fs.readFile(path.join(dir, backup), 'utf8'), damaged, 'the copy is the file as it was found');
  const summary = warnings.find((w) => w.event === 'store_lines_skipped');
  assert.deepEqual(
    { file: summary?.file, skipped: summary?.skipped_lines, backup: summary?.backup },
    { file, skipped: 2, backup: path.join(dir, backup) },
  );
  reopened.append(message(9, 'boss-a', [to('employee-x')]));
  await reopened.close();

  // The damaged lines were set aside: the next start finds nothing to skip and copies nothing.
  const again = await MessageLog.open({ file, logger: silent });
  assert.equal(again.stats().skippedLines, 0);
  assert.deepEqual((await again.query({ offset: 0, limit: 10 })).edges.map((e) => e.record.msg_id), ['m-9', 'm-2', 'm-0']);
  await again.close();
  assert.equal((await backups()).length, 1);
  // NeDB reads the file without complaint.
  const nedb = new Datastore<Record<string, unknown>>({ filename: file, corruptAlertThreshold: 0 });
  await nedb.loadDatabaseAsync();
  assert.deepEqual(nedb.getAllData().map((d) => d.msg_id).sort(), ['m-0', 'm-2', 'm-9']);
});

test('retention and max-messages prune the oldest records, keeping offsets right', async () => {
  const file = newFile();
  const now = Date.now();
  const seed = await MessageLog.open({ file, logger: silent });
  for (let i = 0; i < 20; i++) seed.append(message(i, 'boss-a', [to('employee-x')], now - (20 - i) * 60_000));
  await seed.close();

  const byAge = await MessageLog.open({ file, logger: silent, retentionMs: 10.5 * 60_000 });
  assert.equal(byAge.stats().records, 10);
  byAge.append(message(99, 'boss-a', [to('employee-x')], now));
  const kept = await byAge.query({ offset: 0, limit: 3 });
  assert.deepEqual(kept.edges.map((e) => e.record.msg_id), ['m-99', 'm-19', 'm-18']);
  await byAge.close();

  const byCount = await MessageLog.open({ file, logger: silent, maxMessages: 4 });
  assert.equal(byCount.stats().records, 4);
  const rest = await byCount.query({ offset: 0, limit: 10 });
  assert.deepEqual(rest.edges.map((e) => e.record.msg_id), ['m-99', 'm-19', 'm-18', 'm-17']);
  await byCount.close();
  const [header, ...records] = (await fs.readFile(file, 'utf8')).trim().split('\n');
  assert.equal(records.length, 4, 'the file itself shrank');
  assert.match(header!, /^\{"_id":"audit-chain-anchor","anchor":"[0-9a-f]{64}"\}$/, 'the audit chain anchor heads the pruned file');
});

test('backpressure: append reports the high-water mark and drain follows', async () => {
  const log = await MessageLog.open({ file: newFile(), logger: silent, highWaterMark: 4096 });
  let drained = 0;
  log.onDrain(() => drained++);
  let signalled = false;
  for (let i = 0; i < 200; i++) {
    log.append(message(i, 'boss-a', [to('employee-x')]));
    if (!log.belowHighWaterMark) signalled = true;
  }
  assert.equal(signalled, true);
  await log.flush();
  assert.ok(drained >= 1);
  assert.equal(log.stats().pendingBytes, 0);
  await log.close();
});

test('close() writes every appended record', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent });
  for (let i = 0; i < 50_000; i++) log.append(message(i, 'boss-a', [to('employee-x')]));
  await log.close();
  const reopened = await MessageLog.open({ file, logger: silent });
  assert.equal(reopened.stats().records, 50_000);
  assert.equal((await reopened.query({ offset: 0, limit: 1 })).edges[0]!.record.msg_id, 'm-49999');
  await reopened.close();
});

test('appends while pruning runs are all kept, in order, with offsets right', async () => {
  const file = newFile();
  const log = await MessageLog.open({ file, logger: silent, maxMessages: 500 });
  for (let i = 0; i < 5000; i++) {
    log.append(message(i, 'boss-a', [to('employee-x')]));
    // Let writes and the automatic pruning (past 110% of the cap) run between bursts.
    if (i % 250 === 0) await new Promise((resolve) => setImmediate(resolve));
  }
  const live = await log.query({ offset: 0, limit: 3 });
  assert.deepEqual(live.edges.map((e) => e.record.msg_id), ['m-4999', 'm-4998', 'm-4997']);
  await log.close();
  const reopened = await MessageLog.open({ file, logger: silent });
  assert.ok(reopened.stats().records < 5000, `pruned while appending (${reopened.stats().records} records kept)`);
  assert.equal(reopened.stats().skippedLines, 0);
  const all = await reopened.query({ offset: 0, limit: 5000 });
  const numbers = all.edges.map((e) => Number(e.record.msg_id.slice(2)));
  assert.equal(numbers[0], 4999);
  assert.ok(numbers.every((n, i) => i === 0 || n === numbers[i - 1]! - 1), 'no gaps among the kept records');
  await reopened.close();
});
