// PROTOCOL.md A6: the data dir's NeDB files survive a restart: identities reconnect, bans hold,
// logs stay. Identity keys are stored only as hashes, and clear keys of old data dirs migrate.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
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
