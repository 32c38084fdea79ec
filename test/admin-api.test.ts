// PROTOCOL.md A5: every admin route at /X and /api/X, filters, paging bounds, health objects,
// ban semantics and the JSON errors.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { readAllowed } from '../lib/http-api';
import { nodeHealth } from '../lib/workforce';
import { authBoss, authEmployee, http, reconnect, startTestRelay, TEST_AUTHKEY, type Authed, type TestRelay } from './support';

type Row = Record<string, unknown> & { boss: { id: string }; employee: { id: string }; delivery: { status: string; reason: string | null } };

describe('admin API', () => {
  let env: TestRelay;
  let boss: Authed;
  let alice: Authed;
  let bob: Authed;
  let firstAt: number;

  before(async () => {
    env = await startTestRelay();
    boss = await authBoss(env.relay);
    alice = await authEmployee(env.relay, 'Alice', ['research', 'risk']);
    bob = await authEmployee(env.relay, 'Bob', ['ops']);
    alice.socket.send({ type: 'health_report', valid: true });
    await alice.socket.next('health_report_ack');
    firstAt = Date.now();
    for (let i = 0; i < 3; i++) {
      boss.socket.send({ type: 'message', to: alice.id, payload: { n: i }, msg_id: `a-${i}` });
      await boss.socket.next('delivery_ack');
      await alice.socket.next('message');
    }
    boss.socket.send({ type: 'message', to: bob.id, payload: { n: 'b' }, msg_id: 'b-0' });
    await boss.socket.next('delivery_ack');
    await bob.socket.next('message');
    alice.socket.send({ type: 'message', to: boss.id, payload: 'report', msg_id: 'r-0' });
    await alice.socket.next('delivery_ack');
    await boss.socket.next('message');
    alice.socket.send({ type: 'message', to: bob.id, payload: 'peer', msg_id: 'p-0' });
    await alice.socket.next('delivery_ack');
    await bob.socket.next('message');
  });
  after(async () => {
    await Promise.all([boss, alice, bob].map((a) => a.socket.close()));
    await env.dispose();
  });

  for (const prefix of ['', '/api']) {
    test(`GET ${prefix}/health`, async () => {
      const { status, body } = await http(env.relay, 'GET', `${prefix}/health`);
      assert.equal(status, 200);
      assert.equal(body.ok, true);
      assert.equal(body.service, 'mimiclaw-websocket');
      assert.equal(body.active_connections, 3);
      assert.equal(typeof body.now, 'number');
    });

    test(`GET ${prefix}/employees lists employees with status fields`, async () => {
      const { status, body } = await http(env.relay, 'GET', `${prefix}/employees`);
      assert.equal(status, 200);
      const employees = body.employees as Record<string, unknown>[];
      assert.deepEqual(employees.map((e) => e.id).sort(), [alice.id, bob.id].sort());
      const a = employees.find((e) => e.id === alice.id)!;
      for (const key of ['id', 'role', 'name', 'tags', 'online', 'status', 'banned', 'created_at', 'last_seen', 'meta']) assert.ok(key in a, key);
      assert.equal(a.status, 'online');
      assert.equal(a.name, 'Alice');
      assert.deepEqual(a.tags, ['research', 'risk']);
    });
  }

  test('GET /connections lists bosses and employees', async () => {
    const { body } = await http(env.relay, 'GET', '/api/connections');
    const ids = (body.connections as { id: string }[]).map((c) => c.id);
    assert.deepEqual(ids.sort(), [boss.id, alice.id, bob.id].sort());
  });

  test('GET /admin/workforce summarises and carries health', async () => {
    const { body } = await http(env.relay, 'GET', '/admin/workforce');
    const summary = body.summary as Record<string, unknown>;
    assert.equal(summary.total_nodes, 3);
    assert.equal(summary.boss_count, 1);
    assert.equal(summary.employee_count, 2);
    assert.equal(summary.online_count, 3);
    assert.equal(summary.filtered_by_tag, null);
    const employees = body.employees as { id: string; health: Record<string, unknown> }[];
    const aliceHealth = employees.find((e) => e.id === alice.id)!.health;
    assert.equal(aliceHealth.overall, 'healthy');
    const bobHealth = employees.find((e) => e.id === bob.id)!.health;
    assert.equal(bobHealth.overall, 'degraded');
    assert.deepEqual(bobHealth.reasons, ['self_report_missing']);
    assert.equal((bobHealth.heartbeat as Record<string, unknown>).stale_threshold_ms, 60000);
    assert.equal((bobHealth.self_report as Record<string, unknown>).stale_threshold_ms, 180000);
    assert.equal((bobHealth.connection as Record<string, unknown>).websocket_open, true);
    const byTag = body.employees_by_tag as Record<string, { count: number; employee_ids: string[] }>;
    assert.deepEqual(byTag.research!.employee_ids, [alice.id]);
    const filtered = await http(env.relay, 'GET', '/api/admin/workforce?tag=ops');
    assert.deepEqual((filtered.body.employees as { id: string }[]).map((e) => e.id), [bob.id]);
    assert.equal((filtered.body.summary as Record<string, unknown>).filtered_by_tag, 'ops');
  });

  test('GET /admin/communications lists boss<->employee edges newest first', async () => {
    const { status, body } = await http(env.relay, 'GET', '/admin/communications');
    assert.equal(status, 200);
    assert.equal(body.total, 5, 'the employee-to-employee message is not a boss<->employee edge');
    assert.equal(body.limit, 50);
    assert.equal(body.offset, 0);
    const rows = body.rows as Row[];
    assert.deepEqual(rows.map((r) => r.msg_id), ['r-0', 'b-0', 'a-2', 'a-1', 'a-0']);
    const report = rows[0]!;
    assert.equal(report.direction, 'employee_to_boss');
    assert.equal(report.boss.id, boss.id);
    assert.equal(report.employee.id, alice.id);
    assert.deepEqual(report.delivery, { status: 'delivered', reason: null });
    assert.equal(report.payload, 'report');
    assert.deepEqual(rows[1]!.payload, { n: 'b' });
  });

  test('communications filters and paging', async () => {
    const byEmployee = await http(env.relay, 'GET', `/api/admin/communications?employee_id=${bob.id}`);
    assert.deepEqual((byEmployee.body.rows as Row[]).map((r) => r.msg_id), ['b-0']);
    const byTag = await http(env.relay, 'GET', '/api/admin/communications?tag=research');
    assert.equal(byTag.body.total, 4);
    const byBoss = await http(env.relay, 'GET', `/api/admin/communications?boss_id=${boss.id}&limit=2&offset=1`);
    assert.equal(byBoss.body.total, 5);
    assert.deepEqual((byBoss.body.rows as Row[]).map((r) => r.msg_id), ['b-0', 'a-2']);
    const none = await http(env.relay, 'GET', `/api/admin/communications?until=${firstAt - 1}`);
    assert.equal(none.body.total, 0);
    const since = await http(env.relay, 'GET', `/api/admin/communications?since=${firstAt}`);
    assert.equal(since.body.total, 5);
    assert.deepEqual(since.body.filters, { boss_id: null, employee_id: null, tag: null, since: firstAt, until: null });
  });

  for (const [query, param] of [
    ['limit=0', 'limit'],
    ['limit=501', 'limit'],
    ['limit=abc', 'limit'],
    ['offset=-1', 'offset'],
    ['since=yesterday', 'since'],
    ['until=1.5', 'until'],
  ]) {
    test(`communications ?${query} answers 400 naming ${param}`, async () => {
      const { status, body } = await http(env.relay, 'GET', `/api/admin/communications?${query}`);
      assert.equal(status, 400);
      assert.equal(body.code, 'invalid_query');
      assert.match(String(body.message), new RegExp(`"${param}"`));
    });
  }

  test('unknown routes answer 404 JSON; wrong methods 405', async () => {
    const missing = await http(env.relay, 'GET', '/api/nothing-here');
    assert.equal(missing.status, 404);
    assert.equal(missing.body.code, 'not_found');
    const wrong = await http(env.relay, 'POST', '/api/employees', { authkey: TEST_AUTHKEY });
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get('allow'), 'GET, HEAD');
  });

  test('writes need the authkey', async () => {
    const none = await http(env.relay, 'POST', `/employees/${bob.id}/ban`);
    assert.equal(none.status, 401);
    assert.equal(none.body.code, 'unauthorized');
    const wrong = await http(env.relay, 'DELETE', `/api/employees/${bob.id}/ban`, { authkey: 'nope' });
    assert.equal(wrong.status, 401);
    const employees = await http(env.relay, 'GET', '/employees');
    assert.equal((employees.body.employees as { id: string; banned: boolean }[]).find((e) => e.id === bob.id)!.banned, false);
  });

  test('ban routes: bad bodies, unknown ids, bosses', async () => {
    const badJson = await http(env.relay, 'POST', `/employees/${bob.id}/ban`, { authkey: TEST_AUTHKEY, body: '{nope' });
    assert.equal(badJson.status, 400);
    const badType = await http(env.relay, 'PUT', `/employees/${bob.id}/ban`, { authkey: TEST_AUTHKEY, body: { banned: 'yes' } });
    assert.equal(badType.status, 400);
    const putWithout = await http(env.relay, 'PUT', `/employees/${bob.id}/ban`, { authkey: TEST_AUTHKEY });
    assert.equal(putWithout.status, 400);
    const unknown = await http(env.relay, 'POST', '/employees/employee-nobody/ban', { authkey: TEST_AUTHKEY });
    assert.equal(unknown.status, 404);
    const aBoss = await http(env.relay, 'POST', `/employees/${boss.id}/ban?authkey=${TEST_AUTHKEY}`);
    assert.equal(aBoss.status, 409);
    const badEscape = await http(env.relay, 'POST', '/api/employees/%E0%A4%A/ban', { authkey: TEST_AUTHKEY });
    assert.equal(badEscape.status, 400, 'a broken %-escape in the id is the client\'s mistake, not a 500');
    assert.equal(badEscape.body.code, 'invalid_id');
  });

  test('ban closes the socket with 4008 after a system frame; reconnects are refused; unban restores', async () => {
    const eve = await authEmployee(env.relay, 'Eve', ['temp']);
    const ban = await http(env.relay, 'POST', `/api/employees/${eve.id}/ban`, { authkey: TEST_AUTHKEY });
    assert.equal(ban.status, 200);
    assert.deepEqual(ban.body, { id: eve.id, role: 'employee', name: 'Eve', tags: ['temp'], banned: true, online: false });
    const system = await eve.socket.next('system');
    assert.equal(system.event, 'banned');
    assert.equal(typeof system.by, 'string');
    assert.equal((await eve.socket.closed).code, 4008);

    const employees = await http(env.relay, 'GET', '/employees');
    assert.equal((employees.body.employees as { id: string; status: string }[]).find((e) => e.id === eve.id)!.status, 'banned');

    const retry = await reconnect(env.relay, eve, 'employee');
    assert.equal(retry.ok.code, 'banned');
    assert.equal((await retry.socket.closed).code, 4003);

    const unban = await http(env.relay, 'DELETE', `/employees/${eve.id}/ban`, { authkey: TEST_AUTHKEY });
    assert.equal(unban.body.banned, false);
    const putBan = await http(env.relay, 'PUT', `/employees/${eve.id}/ban`, { authkey: TEST_AUTHKEY, body: { banned: true } });
    assert.equal(putBan.body.banned, true);
    const postUnban = await http(env.relay, 'POST', `/employees/${eve.id}/ban`, { authkey: TEST_AUTHKEY, body: { banned: false } });
    assert.equal(postUnban.body.banned, false);
    const back = await reconnect(env.relay, eve, 'employee');
    assert.equal(back.ok.type, 'auth_ok');
    await back.socket.close();
  });
});

describe('protected reads', () => {
  // A client from another address cannot be made on this loopback-only machine, so the
  // decision itself is tested; the routes call exactly this function.
  test('loopback reads freely; other addresses need the key unless public reads', () => {
    for (const address of ['127.0.0.1', '127.4.5.6', '::1', '::ffff:127.0.0.1']) assert.equal(readAllowed(address, false, false), true, address);
    for (const address of ['10.0.0.7', '192.168.1.2', '::ffff:10.1.1.1', 'fe80::1', undefined]) {
      assert.equal(readAllowed(address, false, false), false, String(address));
      assert.equal(readAllowed(address, true, false), true);
      assert.equal(readAllowed(address, false, true), true);
    }
  });
});

type HealthNode = { id: string; health: { overall: string; reasons: string[]; heartbeat: { last_seen_at: number; stale: boolean; stale_threshold_ms: number } } };

/** Polls the workforce until `done` holds for a response; gives the last one either way. */
async function workforceUntil(env: TestRelay, done: (body: Record<string, unknown>) => boolean, timeoutMs = 15_000): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { body } = await http(env.relay, 'GET', '/api/admin/workforce');
    if (done(body) || Date.now() > deadline) return body;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

describe('workforce health and listing', () => {
  test('an idle peer that answers pings stays healthy past the heartbeat threshold; bosses need no self report', async () => {
    // Two ping intervals is the heartbeat threshold: 200 ms here instead of 60 s.
    const env = await startTestRelay({ pingIntervalMs: 100 });
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay, 'Idle', ['idle']);
      worker.socket.send({ type: 'health_report', valid: true });
      await worker.socket.next('health_report_ack');
      const quietSince = Date.now();
      const find = (body: Record<string, unknown>, id: string) =>
        [...(body.bosses as HealthNode[]), ...(body.employees as HealthNode[])].find((n) => n.id === id)!;
      // Neither client sends a frame from here on: only the relay's pings are answered.
      const body = await workforceUntil(env, (b) =>
        [boss.id, worker.id].every((id) => {
          const { health } = find(b, id);
          return health.heartbeat.last_seen_at > quietSince + 2 * health.heartbeat.stale_threshold_ms && health.overall === 'healthy';
        }),
      );
      for (const id of [boss.id, worker.id]) {
        const { health } = find(body, id);
        assert.equal(health.heartbeat.stale_threshold_ms, 200);
        assert.ok(health.heartbeat.last_seen_at > quietSince + 400, `${id}: pongs must count as heartbeats (last_seen_at ${health.heartbeat.last_seen_at - quietSince} ms after going quiet)`);
        assert.deepEqual(health.reasons, [], id);
        assert.equal(health.overall, 'healthy', id);
      }
      assert.deepEqual((body.summary as { health: unknown }).health, { healthy: 2, degraded: 0, unhealthy: 0 });
      await Promise.all([boss.socket.close(), worker.socket.close()]);
    } finally {
      await env.dispose();
    }
  });

  test('a heartbeat older than the threshold is stale; a boss is never missing a self report', () => {
    const now = 1_000_000;
    const identity = (role: 'boss' | 'employee', lastSeen: number) => ({
      id: `${role}-x`, role, keyHash: '', banned: false, name: null, tags: [], meta: null, createdAt: 0, lastSeen,
      lastConnectedAt: 0, lastDisconnectedAt: null, lastHeartbeatAt: null, lastSelfReportAt: null, selfReportValid: null, credential: null, ephemeral: false,
    });
    const fresh = nodeHealth(identity('boss', now - 10), true, now, 1000);
    assert.deepEqual(fresh.reasons, []);
    assert.equal(fresh.heartbeat.stale_threshold_ms, 1000);
    const stale = nodeHealth(identity('boss', now - 5000), true, now, 1000);
    assert.deepEqual(stale.reasons, ['heartbeat_stale']);
    // Activity newer than the stored last_seen (a pong) is the heartbeat.
    const ponged = nodeHealth(identity('employee', now - 5000), true, now, 1000, now - 20);
    assert.deepEqual(ponged.reasons, ['self_report_missing']);
    assert.equal(ponged.heartbeat.last_seen_at, now - 20);
    assert.equal(ponged.heartbeat.stale, false);
  });

  test('nodes are listed in registration order, and the workforce is compact JSON', async () => {
    const env = await startTestRelay();
    const made: Authed[] = [];
    try {
      for (let i = 0; i < 8; i++) made.push(await authEmployee(env.relay, `Ordered-${i}`, ['order']));
      const boss = await authBoss(env.relay);
      made.push(boss);
      const employeeIds = made.slice(0, 8).map((m) => m.id);
      const employees = await http(env.relay, 'GET', '/api/employees');
      assert.deepEqual((employees.body.employees as { id: string }[]).map((e) => e.id), employeeIds);
      const connections = await http(env.relay, 'GET', '/api/connections');
      assert.deepEqual((connections.body.connections as { id: string }[]).map((e) => e.id), [...employeeIds, boss.id]);
      const response = await fetch(env.relay.httpUrl + '/api/admin/workforce');
      const text = await response.text();
      assert.equal(text, JSON.stringify(JSON.parse(text)), 'the workforce is sent without indentation');
      const body = JSON.parse(text) as { employees: { id: string }[]; employees_by_tag: Record<string, { employee_ids: string[] }> };
      assert.deepEqual(body.employees.map((e) => e.id), employeeIds);
      assert.deepEqual(body.employees_by_tag.order!.employee_ids, employeeIds);
      // Any string is a tag, even one named like an Object.prototype property.
      const odd = await authEmployee(env.relay, 'Odd', ['__proto__', 'constructor']);
      made.push(odd);
      const withOdd = await http(env.relay, 'GET', '/api/admin/workforce');
      assert.equal(withOdd.status, 200);
      const groups = withOdd.body.employees_by_tag as Record<string, { employee_ids: string[] }>;
      assert.ok(Object.hasOwn(groups, '__proto__'));
      assert.deepEqual(groups['__proto__']!.employee_ids, [odd.id]);
      assert.deepEqual(groups['constructor']!.employee_ids, [odd.id]);
      assert.equal(({} as Record<string, unknown>).count, undefined, 'nothing leaked onto Object.prototype');
    } finally {
      await Promise.all(made.map((m) => m.socket.close()));
      await env.dispose();
    }
  });
});
