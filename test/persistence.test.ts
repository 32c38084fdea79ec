// PROTOCOL.md A6: the data dir's NeDB files survive a restart: identities reconnect, bans hold,
// logs stay. Identity keys are stored only as hashes, and clear keys of old data dirs migrate.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { parseCommandLine } from '../lib/cli-args';
import { createLogger } from '../lib/logger';
import { resolveOptions } from '../lib/options';
import { authBoss, authEmployee, http, makeTempDir, reconnect, startTestRelay, TEST_AUTHKEY } from './support';

test('identities, bans and logs survive a restart', async () => {
  let env = await startTestRelay();
  try {
    const boss = await authBoss(env.relay);
    const alice = await authEmployee(env.relay, 'Alice', ['research']);
    const mallory = await authEmployee(env.relay, 'Mallory', ['bad']);
    boss.socket.send({ type: 'message', to: alice.id, payload: { keep: true }, msg_id: 'persist-1' });
    await boss.socket.next('delivery_ack');
    await http(env.relay, 'POST', `/employees/${mallory.id}/ban`, { authkey: TEST_AUTHKEY });
    await mallory.socket.closed;

    env = await env.restart();
    for (const file of ['identities.db', 'connections.db', 'messages.db']) {
      await fs.access(path.join(env.dataDir, file));
    }
    const again = await reconnect(env.relay, alice, 'employee');
    assert.equal(again.ok.type, 'auth_ok');
    assert.equal(again.ok.reconnected, true);
    assert.equal(again.ok.name, 'Alice');
    const bossAgain = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    assert.equal(bossAgain.ok.reconnected, true);
    const banned = await reconnect(env.relay, mallory, 'employee');
    assert.equal(banned.ok.code, 'banned');

    const log = await http(env.relay, 'GET', '/api/admin/communications');
    assert.equal((log.body.rows as { msg_id: string }[])[0]!.msg_id, 'persist-1');
    const employees = await http(env.relay, 'GET', '/api/employees');
    const byId = new Map((employees.body.employees as { id: string; status: string }[]).map((e) => [e.id, e.status]));
    assert.equal(byId.get(mallory.id), 'banned');
    assert.equal(byId.get(alice.id), 'online');

    const identitiesFile = await fs.readFile(path.join(env.dataDir, 'identities.db'), 'utf8');
    assert.ok(!identitiesFile.includes(alice.key), 'the clear identity key is never written');
    const connections = await fs.readFile(path.join(env.dataDir, 'connections.db'), 'utf8');
    for (const event of ['auth_ok', 'reconnect', 'disconnect', 'ban', 'auth_fail']) assert.ok(connections.includes(`"event":"${event}"`), event);
    await Promise.all([again.socket.close(), bossAgain.socket.close()]);
  } finally {
    await env.dispose();
  }
});

test('a data dir with clear identity keys is migrated to hashes and still reconnects', async () => {
  const dir = await makeTempDir();
  const now = Date.now();
  const legacy = {
    _id: 'employee-00000000-0000-4000-8000-000000000001',
    id: 'employee-00000000-0000-4000-8000-000000000001',
    role: 'employee',
    key: 'legacy-clear-key-0123456789',
    banned: false,
    createdAt: now,
    lastSeen: now,
    name: 'Legacy',
    tags: ['old'],
    status: 'offline',
    meta: { host: 'a' },
  };
  await fs.writeFile(path.join(dir, 'identities.db'), JSON.stringify(legacy) + '\n');
  const env = await startTestRelay({}, dir);
  try {
    const file = await fs.readFile(path.join(dir, 'identities.db'), 'utf8');
    assert.ok(!file.includes(legacy.key), 'the clear key is gone from the file');
    const again = await reconnect(env.relay, { id: legacy.id, key: legacy.key }, 'employee');
    assert.equal(again.ok.type, 'auth_ok');
    assert.equal(again.ok.name, 'Legacy');
    await again.socket.close();
  } finally {
    await env.dispose();
  }
});

test('a damaged line in identities.db is skipped and the rest loads', async () => {
  const env = await startTestRelay();
  const alice = await authEmployee(env.relay, 'Alice', ['x']);
  await alice.socket.close();
  const restarted = await env.restart();
  await restarted.relay.close();
  const file = path.join(env.dataDir, 'identities.db');
  await fs.appendFile(file, '{"_id":"employee-broken","role":"empl');
  const again = await startTestRelay({}, env.dataDir);
  try {
    const back = await reconnect(again.relay, alice, 'employee');
    assert.equal(back.ok.type, 'auth_ok');
    const files = await fs.readdir(env.dataDir);
    assert.ok(files.some((f) => f.startsWith('identities.db.corrupt-')), 'a copy of the damaged file is kept');
    await back.socket.close();
  } finally {
    await again.dispose();
  }
});

/** Permission bits of a file or dir. */
async function modeOf(file: string): Promise<number> {
  return (await fs.stat(file)).mode & 0o777;
}

const STORE_FILES = ['identities.db', 'connections.db', 'messages.db', 'queue.db'];

test('the data dir is created 0700 and its files 0600, and they stay so through compaction and pruning', async () => {
  const parent = await makeTempDir();
  const dir = path.join(parent, 'data');
  let env = await startTestRelay({}, dir);
  try {
    assert.equal((await modeOf(dir)).toString(8), '700');
    const boss = await authBoss(env.relay);
    const alice = await authEmployee(env.relay, 'Alice', ['x']);
    for (let i = 0; i < 5; i++) {
      boss.socket.send({ type: 'message', to: alice.id, payload: { i }, msg_id: `mode-${i}` });
      await boss.socket.next('delivery_ack');
    }
    await Promise.all([boss.socket.close(), alice.socket.close()]);
    for (const file of [...STORE_FILES, 'node-id', 'relay.lock']) assert.equal((await modeOf(path.join(dir, file))).toString(8), '600', file);

    // With a lower cap the restart rewrites messages.db without its oldest records; the NeDB
    // files are compacted (written anew and renamed) on the maintenance interval.
    env = await env.restart({ maxMessages: 2, maintenanceIntervalMs: 1000 });
    const rows = await http(env.relay, 'GET', '/api/admin/communications');
    assert.equal(rows.body.total, 2, 'messages.db was rewritten');
    const inodes = async () => Promise.all(['identities.db', 'queue.db'].map(async (f) => (await fs.stat(path.join(dir, f))).ino));
    const before = await inodes();
    const started = Date.now();
    while ((await inodes()).some((ino, i) => ino === before[i])) {
      if (Date.now() - started > 20_000) assert.fail('the NeDB files were not compacted');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    for (const file of STORE_FILES) assert.equal((await modeOf(path.join(dir, file))).toString(8), '600', `${file} after compaction`);
    assert.equal((await modeOf(dir)).toString(8), '700');
  } finally {
    await env.dispose();
    await fs.rm(parent, { recursive: true, force: true });
  }
});

test('files an older version left 0644 are tightened to 0600 (a damaged one\'s copy too); an existing open dir is left alone with a warning', async () => {
  const dir = await makeTempDir();
  const first = await startTestRelay({}, dir);
  const alice = await authEmployee(first.relay, 'Alice', ['x']);
  await alice.socket.close();
  await first.relay.close();
  await fs.chmod(dir, 0o755);
  for (const file of STORE_FILES) await fs.chmod(path.join(dir, file), 0o644);
  await fs.appendFile(path.join(dir, 'identities.db'), '{"_id":"employee-broken","role":"empl');

  const warnings: Record<string, unknown>[] = [];
  const logger = createLogger('warn', (line) => warnings.push(JSON.parse(line) as Record<string, unknown>));
  const env = await startTestRelay({ logger }, dir);
  try {
    for (const file of STORE_FILES) assert.equal((await modeOf(path.join(dir, file))).toString(8), '600', file);
    const backup = (await fs.readdir(dir)).find((f) => f.startsWith('identities.db.corrupt-'));
    assert.ok(backup);
    assert.equal((await modeOf(path.join(dir, backup))).toString(8), '600', 'the copy of the damaged file');
    assert.equal((await modeOf(dir)).toString(8), '755', 'an existing dir keeps its mode');
    const warning = warnings.find((w) => w.event === 'data_dir_permissions');
    assert.ok(warning, 'a warning names the open dir');
    assert.equal(warning.dir, dir);
    assert.equal(warning.mode, '755');
    assert.match(String(warning.advice), /chmod 700/);
  } finally {
    await env.dispose();
  }
});

test('fileMode (--file-mode) sets the files\' mode and the new dir\'s (read bits get search bits)', async () => {
  const parent = await makeTempDir();
  const dir = path.join(parent, 'data');
  const env = await startTestRelay({ fileMode: 0o640 }, dir);
  try {
    assert.equal((await modeOf(dir)).toString(8), '750');
    for (const file of STORE_FILES) assert.equal((await modeOf(path.join(dir, file))).toString(8), '640', file);
  } finally {
    await env.dispose();
    await fs.rm(parent, { recursive: true, force: true });
  }
  const parsed = parseCommandLine(['--file-mode', '640', '--authkey', 'k'], {});
  assert.equal(parsed.kind === 'run' ? parsed.options.fileMode : undefined, 0o640);
  assert.throws(() => parseCommandLine(['--file-mode', 'rw', '--authkey', 'k'], {}), /octal mode such as 600/);
  assert.throws(() => resolveOptions({ authkey: 'k', fileMode: 0o400 }), /fileMode must give the owner read and write/);
  assert.throws(() => resolveOptions({ authkey: 'k', fileMode: 0o1600 }), /fileMode/);
});
