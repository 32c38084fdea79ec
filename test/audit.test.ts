// The audit trail: messages.db lines and connections.db events are hash-chained; `mimiclaw-ws
// verify` and GET /api/admin/audit/verify name the first broken link, or say intact.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { verifyDataDir, type AuditReport } from '../lib/audit-chain';
import { ConnectionLog } from '../lib/connection-log';
import { createLogger } from '../lib/logger';
import { MessageLog } from '../lib/message-log';
import { authBoss, authEmployee, http, makeTempDir, reconnect, startTestRelay, TEST_AUTHKEY } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');
const silent = createLogger('silent');

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, MIMICLAW_RELAY_HOME: '' } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/** A data dir written by a real relay: messages (one queued, later delivered), connects, a ban and an unban. */
async function populatedDir(): Promise<{ dataDir: string; msgIds: string[] }> {
  const relay = await startTestRelay();
  const boss = await authBoss(relay.relay);
  const worker = await authEmployee(relay.relay, 'Auditor', ['audit']);
  const msgIds: string[] = [];
  for (let i = 0; i < 5; i++) {
    const msgId = `audit-${i}`;
    boss.socket.send({ type: 'message', to: worker.id, msg_id: msgId, payload: { n: i, text: 'hello world' } });
    await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === msgId);
    await worker.socket.next((f) => f.type === 'message' && f.msg_id === msgId);
    msgIds.push(msgId);
  }
  const late = await authEmployee(relay.relay, 'Late', ['audit']);
  await late.socket.close();
  boss.socket.send({ type: 'message', to: late.id, msg_id: 'audit-queued', queue: true, payload: { text: 'for later' } });
  await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'audit-queued');
  const back = await reconnect(relay.relay, late, 'employee');
  assert.equal(back.ok.type, 'auth_ok');
  await back.socket.next((f) => f.type === 'message' && f.msg_id === 'audit-queued');
  assert.equal((await http(relay.relay, 'POST', `/api/employees/${worker.id}/ban`, { authkey: TEST_AUTHKEY })).status, 200);
  assert.equal((await http(relay.relay, 'DELETE', `/api/employees/${worker.id}/ban`, { authkey: TEST_AUTHKEY })).status, 200);
  await back.socket.close();
  await boss.socket.close();
  await relay.relay.close();
  return { dataDir: relay.dataDir, msgIds };
}

async function lines(file: string): Promise<string[]> {
  return (await fs.readFile(file, 'utf8')).split('\n');
}

function fileReport(report: AuditReport, name: string) {
  const found = report.files.find((f) => f.file === name);
  assert.ok(found, `no report for ${name}`);
  return found;
}

test('verify: a relay-written data dir is intact, by the CLI and the admin route', async () => {
  const { dataDir } = await populatedDir();
  try {
    const cli = await runCli(['verify', '--data-dir', dataDir]);
    assert.equal(cli.code, 0, cli.stderr);
    assert.match(cli.stdout, /^intact: \d+ records checked/);
    const json = await runCli(['verify', '--data-dir', dataDir, '--json']);
    const report = JSON.parse(json.stdout) as AuditReport;
    assert.equal(report.intact, true);
    const messages = fileReport(report, 'messages.db');
    // 6 routed messages, and the queued one's later version is a link too.
    assert.equal(messages.checked, 7);
    assert.equal(messages.unchained, 0);
    const connections = fileReport(report, 'connections.db');
    assert.ok(connections.checked >= 8, `connection events checked: ${connections.checked}`);

    const relay = await startTestRelay({}, dataDir);
    try {
      const boss = await authBoss(relay.relay);
      boss.socket.send({ type: 'message', to: '*', msg_id: 'live', payload: { x: 1 } });
      await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'live');
      const answer = await http(relay.relay, 'GET', '/api/admin/audit/verify');
      assert.equal(answer.status, 200);
      const live = answer.body as unknown as AuditReport;
      assert.equal(live.intact, true);
      assert.equal(fileReport(live, 'messages.db').checked, 8, 'the chain went on across the restart');
      assert.equal((await http(relay.relay, 'POST', '/api/admin/audit/verify')).status, 405);
      await boss.socket.close();
    } finally {
      await relay.relay.close();
    }
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: one payload byte changed in messages.db names that file, line and record', async () => {
  const { dataDir } = await populatedDir();
  try {
    const file = path.join(dataDir, 'messages.db');
    const all = await lines(file);
    const index = all.findIndex((line) => line.includes('"msg_id":"audit-2"'));
    assert.ok(index >= 0);
    const recordId = (JSON.parse(all[index]!) as { _id: string })._id;
    all[index] = all[index]!.replace('hello world', 'hello worle');
    await fs.writeFile(file, all.join('\n'));
    const cli = await runCli(['verify', '--data-dir', dataDir]);
    assert.equal(cli.code, 1);
    assert.match(cli.stdout, new RegExp(`^broken: messages\\.db line ${index + 1}, record ${recordId}: hash does not match`));
    const report = await verifyDataDir(dataDir);
    assert.deepEqual(
      { file: report.first_broken?.file, line: report.first_broken?.line, record: report.first_broken?.record_id },
      { file: 'messages.db', line: index + 1, record: recordId },
    );
    // The running relay reports the same link, and goes on appending meanwhile.
    const relay = await startTestRelay({}, dataDir);
    try {
      const answer = await http(relay.relay, 'GET', '/api/admin/audit/verify');
      assert.equal(answer.status, 200);
      const live = answer.body as unknown as AuditReport;
      assert.equal(live.intact, false);
      assert.deepEqual(
        { file: live.first_broken?.file, line: live.first_broken?.line, record: live.first_broken?.record_id },
        { file: 'messages.db', line: index + 1, record: recordId },
      );
    } finally {
      await relay.relay.close();
    }
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: a line removed from messages.db is named at the record after it', async () => {
  const { dataDir } = await populatedDir();
  try {
    const file = path.join(dataDir, 'messages.db');
    const all = await lines(file);
    const index = all.findIndex((line) => line.includes('"msg_id":"audit-1"'));
    const nextId = (JSON.parse(all[index + 1]!) as { _id: string })._id;
    all.splice(index, 1);
    await fs.writeFile(file, all.join('\n'));
    const report = await verifyDataDir(dataDir);
    assert.equal(report.intact, false);
    assert.equal(report.first_broken?.file, 'messages.db');
    assert.equal(report.first_broken?.line, index + 1);
    assert.equal(report.first_broken?.record_id, nextId);
    assert.equal(fileReport(report, 'messages.db').checked, index, 'the links before the gap checked out');
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: connections.db events changed or removed are named by line, id and seq', async () => {
  const { dataDir } = await populatedDir();
  try {
    const file = path.join(dataDir, 'connections.db');
    const original = await lines(file);
    const banIndex = original.findIndex((line) => line.includes('"event":"ban"'));
    assert.ok(banIndex >= 0, 'the ban was logged');
    const ban = JSON.parse(original[banIndex]!) as { _id: string; seq: number };

    const edited = [...original];
    edited[banIndex] = edited[banIndex]!.replace('"event":"ban"', '"event":"unban"');
    await fs.writeFile(file, edited.join('\n'));
    let report = await verifyDataDir(dataDir);
    assert.equal(report.first_broken?.file, 'connections.db');
    assert.equal(report.first_broken?.line, banIndex + 1);
    assert.equal(report.first_broken?.record_id, ban._id);
    assert.equal(report.first_broken?.seq, ban.seq);
    assert.match(report.first_broken?.reason ?? '', /changed/);
    const cli = await runCli(['verify', '--data-dir', dataDir]);
    assert.equal(cli.code, 1);
    assert.match(cli.stdout, new RegExp(`connections\\.db line ${banIndex + 1}, record ${ban._id} \\(seq ${ban.seq}\\)`));

    const removed = original.filter((_, i) => i !== banIndex);
    await fs.writeFile(file, removed.join('\n'));
    report = await verifyDataDir(dataDir);
    assert.equal(report.first_broken?.file, 'connections.db');
    assert.equal(report.first_broken?.seq, ban.seq + 1);
    assert.match(report.first_broken?.reason ?? '', new RegExp(`events ${ban.seq} are missing`));
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: pruning messages.db and connections.db keeps the chain verifiable from its anchor', async () => {
  const dataDir = await makeTempDir();
  try {
    const file = path.join(dataDir, 'messages.db');
    const log = await MessageLog.open({ file, logger: silent, maxMessages: 50, maintenanceIntervalMs: 3_600_000 });
    const base = { from_id: 'boss-1', from_role: 'boss' as const, delivered: ['employee-1'], failed: [], queued: [] };
    // More than 10% over the cap, the log prunes itself, and appends go on meanwhile.
    for (let i = 0; i < 70; i++) {
      log.append({ ...base, msg_id: `m${i}`, timestamp: Date.now(), payload_json: JSON.stringify({ i }) });
      if (i % 10 === 0) await log.flush();
    }
    await log.close();
    const text = await fs.readFile(file, 'utf8');
    assert.ok(!text.includes('"msg_id":"m0"'), 'the oldest records were pruned');
    assert.match(text.split('\n')[0]!, /^\{"_id":"audit-chain-anchor","anchor":"[0-9a-f]{64}"\}$/);

    const events = await ConnectionLog.open(path.join(dataDir, 'connections.db'), silent, 3_600_000);
    for (let i = 0; i < 30; i++) events.record({ identityId: `employee-${i}`, role: 'employee', event: 'auth_ok', timestamp: 1000 + i, online: true });
    await events.flush();
    assert.equal(await events.prune({ retentionMs: 0, maxEvents: 10 }), 20);
    events.record({ identityId: 'employee-x', role: 'employee', event: 'disconnect', timestamp: 5000, online: false, code: 1000 });
    await events.close();
    // Reopened, the chain goes on from the last kept event.
    const again = await ConnectionLog.open(path.join(dataDir, 'connections.db'), silent, 3_600_000);
    assert.equal(again.size, 11);
    again.record({ identityId: 'employee-y', role: 'employee', event: 'auth_ok', timestamp: 6000, online: true });
    await again.close();

    const report = await verifyDataDir(dataDir);
    assert.equal(report.intact, true, JSON.stringify(report.first_broken));
    const messages = fileReport(report, 'messages.db');
    assert.notEqual(messages.anchor, '0'.repeat(64));
    assert.ok(messages.checked >= 50 && messages.checked <= 66, `messages checked ${messages.checked}`);
    const connections = fileReport(report, 'connections.db');
    assert.equal(connections.checked, 12);
    assert.equal(connections.chain_start, 21);

    // The anchor is what makes the kept part verify: without it the first kept record is named.
    await fs.writeFile(file, text.split('\n').slice(1).join('\n'));
    const unanchored = await verifyDataDir(dataDir);
    assert.equal(unanchored.first_broken?.file, 'messages.db');
    assert.equal(unanchored.first_broken?.line, 1);
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: records from before the audit trail are unchained, and the chain starts after them', async () => {
  const dataDir = await makeTempDir();
  try {
    const file = path.join(dataDir, 'messages.db');
    const legacy = [1, 2, 3].map((i) =>
      JSON.stringify({ _id: `old${i}`, msg_id: `old-${i}`, timestamp: Date.now() - 1000 + i, from_id: 'boss-1', from_role: 'boss', delivered: ['employee-1'], failed: [], queued: [], payload: { i } }),
    );
    await fs.writeFile(file, legacy.join('\n') + '\n');
    await fs.writeFile(path.join(dataDir, 'connections.db'), JSON.stringify({ _id: 'oldevent1', identityId: 'employee-1', role: 'employee', event: 'auth_ok', timestamp: Date.now() - 1000, online: true }) + '\n');
    const relay = await startTestRelay({}, dataDir);
    const boss = await authBoss(relay.relay);
    boss.socket.send({ type: 'message', to: '*', msg_id: 'new-1', payload: { fresh: true } });
    await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'new-1');
    await boss.socket.close();
    await relay.relay.close();

    const report = await verifyDataDir(dataDir);
    assert.equal(report.intact, true, JSON.stringify(report.first_broken));
    const messages = fileReport(report, 'messages.db');
    assert.deepEqual({ unchained: messages.unchained, chain_start: messages.chain_start, checked: messages.checked }, { unchained: 3, chain_start: 4, checked: 1 });
    const connections = fileReport(report, 'connections.db');
    assert.equal(connections.unchained, 1);
    assert.ok(connections.checked >= 2);
    const cli = await runCli(['verify', '--data-dir', dataDir]);
    assert.equal(cli.code, 0);
    assert.match(cli.stdout, /messages\.db 1 \(\+3 unchained, before the chain starts\)/);

    // A line without a hash inside the chain is not "unchained": it is a broken link.
    await fs.appendFile(file, legacy[0]!.replace('old1', 'inserted') + '\n');
    const inserted = await verifyDataDir(dataDir);
    assert.equal(inserted.first_broken?.record_id, 'inserted');
    assert.match(inserted.first_broken?.reason ?? '', /no hash/);
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test('verify: bad arguments exit 2 with the usage, a dir without stores exits 1', async () => {
  const bad = await runCli(['verify', '--bogus']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /unknown option --bogus\nusage: mimiclaw-ws verify/);
  const dir = await makeTempDir();
  try {
    const empty = await runCli(['verify', '--data-dir', dir]);
    assert.equal(empty.code, 1);
    assert.match(empty.stderr, /no messages\.db or connections\.db/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('verify: a last line cut off by a crash is passed over, and the chain goes on intact after the restart', async () => {
  const dataDir = await makeTempDir();
  try {
    const file = path.join(dataDir, 'messages.db');
    const base = { from_id: 'boss-1', from_role: 'boss' as const, delivered: ['employee-1'], failed: [], queued: [] };
    const first = await MessageLog.open({ file, logger: silent });
    for (let i = 0; i < 3; i++) first.append({ ...base, msg_id: `m${i}`, timestamp: Date.now(), payload_json: '{"i":1}' });
    await first.close();
    // What a crash mid-write leaves: the start of a line, no newline.
    await fs.appendFile(file, '{"_id":"torn","msg_id":"m3","timest');
    const torn = await verifyDataDir(dataDir);
    assert.equal(torn.intact, true, JSON.stringify(torn.first_broken));
    assert.equal(fileReport(torn, 'messages.db').torn_last_line, true);
    assert.equal(fileReport(torn, 'messages.db').checked, 3);

    const second = await MessageLog.open({ file, logger: silent });
    second.append({ ...base, msg_id: 'm4', timestamp: Date.now(), payload_json: '{"i":2}' });
    await second.close();
    const after = await verifyDataDir(dataDir);
    assert.equal(after.intact, true, JSON.stringify(after.first_broken));
    assert.equal(fileReport(after, 'messages.db').checked, 4);
    assert.equal(fileReport(after, 'messages.db').torn_last_line, false);
  } finally {
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});
