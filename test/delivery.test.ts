// PROTOCOL.md part B: store-and-forward, expiry, idempotent send, tag routing, limits with
// clear errors, and the employee registration key.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { authBoss, authEmployee, connect, http, reconnect, singleRelayOnly, startTestRelay, TEST_AUTHKEY, type Frame } from './support';

type Row = { msg_id: string; delivery: { status: string } };

describe('store-and-forward', () => {
  test('queue:true holds messages for an offline employee and delivers them in order at its next auth', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay, 'Worker', ['q']);
      await worker.socket.close();
      for (let i = 0; i < 5; i++) {
        boss.socket.send({ type: 'message', to: worker.id, payload: { i }, msg_id: `q-${i}`, queue: true });
        const ack = await boss.socket.next('delivery_ack');
        assert.deepEqual(ack.queued, [worker.id]);
        assert.deepEqual(ack.delivered, []);
        assert.deepEqual(ack.failed, []);
      }
      const log = await http(env.relay, 'GET', `/api/admin/communications?employee_id=${worker.id}`);
      assert.deepEqual((log.body.rows as Row[]).map((r) => r.delivery.status), ['queued', 'queued', 'queued', 'queued', 'queued']);

      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      const received: unknown[] = [];
      for (let i = 0; i < 5; i++) received.push((await back.socket.next('message')).payload);
      assert.deepEqual(received, [0, 1, 2, 3, 4].map((i) => ({ i })));
      const updates: Frame[] = [];
      for (let i = 0; i < 5; i++) updates.push(await boss.socket.next('delivery_update'));
      assert.deepEqual(updates.map((u) => [u.msg_id, u.id, u.status]), [0, 1, 2, 3, 4].map((i) => [`q-${i}`, worker.id, 'delivered']));
      await back.socket.close();
      const again = await reconnect(env.relay, worker, 'employee');
      await assert.rejects(again.socket.next('message', 300), 'nothing is delivered twice');
      const after = await http(env.relay, 'GET', `/api/admin/communications?employee_id=${worker.id}`);
      assert.deepEqual((after.body.rows as Row[]).map((r) => r.delivery.status), ['delivered', 'delivered', 'delivered', 'delivered', 'delivered']);
      await Promise.all([again.socket.close(), boss.socket.close()]);
    } finally {
      await env.dispose();
    }
  });

  test('queued messages survive a restart', async () => {
    let env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay);
      await worker.socket.close();
      boss.socket.send({ type: 'message', to: worker.id, payload: 'kept', queue: true });
      assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [worker.id]);
      env = await env.restart();
      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal((await back.socket.next('message')).payload, 'kept');
      await back.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('a queued message expires after its ttl_ms and the sender is told', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay);
      await worker.socket.close();
      boss.socket.send({ type: 'message', to: worker.id, payload: 'late', msg_id: 'exp-1', queue: true, ttl_ms: 50 });
      await boss.socket.next('delivery_ack');
      const update = await boss.socket.next('delivery_update', 5000);
      assert.deepEqual([update.msg_id, update.id, update.status], ['exp-1', worker.id, 'expired']);
      const back = await reconnect(env.relay, worker, 'employee');
      await assert.rejects(back.socket.next('message', 300));
      const log = await http(env.relay, 'GET', '/api/admin/communications');
      assert.equal((log.body.rows as Row[])[0]!.delivery.status, 'expired');
      await back.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('--queue-ttl queues every message unless it says queue:false', async () => {
    const env = await startTestRelay({ queueTtlMs: 60_000 });
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay);
      await worker.socket.close();
      boss.socket.send({ type: 'message', to: worker.id, payload: 1 });
      assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [worker.id]);
      boss.socket.send({ type: 'message', to: worker.id, payload: 2, queue: false });
      assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: worker.id, reason: 'target_offline' }]);
      boss.socket.send({ type: 'message', to: 'employee-unknown', payload: 3 });
      assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'employee-unknown', reason: 'target_not_found' }]);
    } finally {
      await env.dispose();
    }
  });

  test('bad queue fields are refused with invalid_frame', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      boss.socket.send({ type: 'message', to: '*', payload: 1, queue: 'yes' });
      assert.equal((await boss.socket.next('error')).code, 'invalid_frame');
      boss.socket.send({ type: 'message', to: '*', payload: 1, queue: true, ttl_ms: -5 });
      assert.equal((await boss.socket.next('error')).code, 'invalid_frame');
      boss.socket.send({ type: 'message', to: '*', payload: 1, msg_id: 42 });
      assert.equal((await boss.socket.next('error')).code, 'invalid_msg_id');
    } finally {
      await env.dispose();
    }
  });
});

describe('idempotent send', () => {
  test('a repeated msg_id is not routed again, also after a reconnect and a restart', async () => {
    let env = await startTestRelay();
    try {
      let boss = await authBoss(env.relay);
      let worker = await authEmployee(env.relay);
      boss.socket.send({ type: 'message', to: worker.id, payload: 'once', msg_id: 'same' });
      const first = await boss.socket.next('delivery_ack');
      assert.equal(first.duplicate, undefined);
      await worker.socket.next('message');
      boss.socket.send({ type: 'message', to: worker.id, payload: 'once', msg_id: 'same' });
      const second = await boss.socket.next('delivery_ack');
      assert.equal(second.duplicate, true);
      assert.deepEqual(second.delivered, first.delivered);
      await assert.rejects(worker.socket.next('message', 300));

      await boss.socket.close();
      const bossBack = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
      bossBack.socket.send({ type: 'message', to: worker.id, payload: 'once', msg_id: 'same' });
      assert.equal((await bossBack.socket.next('delivery_ack')).duplicate, true);

      env = await env.restart();
      const bossAfter = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
      const workerAfter = await reconnect(env.relay, worker, 'employee');
      bossAfter.socket.send({ type: 'message', to: worker.id, payload: 'once', msg_id: 'same' });
      const third = await bossAfter.socket.next('delivery_ack');
      assert.equal(third.duplicate, true);
      assert.deepEqual(third.delivered, [worker.id]);
      await assert.rejects(workerAfter.socket.next('message', 300));
      // Another sender may use the same msg_id.
      const other = await authBoss(env.relay);
      other.socket.send({ type: 'message', to: worker.id, payload: 'theirs', msg_id: 'same' });
      assert.equal((await other.socket.next('delivery_ack')).duplicate, undefined);
      assert.equal((await workerAfter.socket.next('message')).payload, 'theirs');
      boss = { ...boss, socket: bossAfter.socket };
      worker = { ...worker, socket: workerAfter.socket };
      await Promise.all([boss.socket.close(), worker.socket.close(), other.socket.close()]);
    } finally {
      await env.dispose();
    }
  });
});

describe('tag routing and broadcast', () => {
  test('tag:<name> reaches every employee with that tag; broadcast lists no offline ones', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const r1 = await authEmployee(env.relay, 'R1', ['research']);
      const r2 = await authEmployee(env.relay, 'R2', ['research', 'ops']);
      const ops = await authEmployee(env.relay, 'Ops', ['ops']);
      const gone = await authEmployee(env.relay, 'Gone', ['research']);
      await gone.socket.close();
      boss.socket.send({ type: 'message', to: 'tag:research', payload: 'study' });
      assert.equal((await r1.socket.next('message')).to, r1.id);
      assert.equal((await r2.socket.next('message')).to, r2.id);
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual([...(ack.delivered as string[])].sort(), [r1.id, r2.id].sort());
      assert.deepEqual(ack.failed, [{ id: gone.id, reason: 'target_offline' }]);
      await assert.rejects(ops.socket.next('message', 200));

      boss.socket.send({ type: 'message', to: '*', payload: 'all' });
      const all = await boss.socket.next('delivery_ack');
      assert.equal((all.delivered as string[]).length, 3);
      assert.deepEqual(all.failed, []);
      boss.socket.send({ type: 'message', to: 'tag:nobody', payload: 'x' });
      const none = await boss.socket.next('delivery_ack');
      assert.deepEqual([none.delivered, none.failed], [[], []]);
      boss.socket.send({ type: 'message', to: 'tag:  ', payload: 'x' });
      assert.equal((await boss.socket.next('error')).code, 'invalid_to');
    } finally {
      await env.dispose();
    }
  });
});

describe('limits', () => {
  test('payload_too_large, too_many_targets and rate_limited keep the connection usable', async () => {
    const env = await startTestRelay({ maxPayloadBytes: 4096, maxTargets: 3, rateLimit: 5 });
    try {
      const boss = await authBoss(env.relay);
      boss.socket.send({ type: 'message', to: '*', payload: 'x'.repeat(5000) });
      const big = await boss.socket.next('error');
      assert.equal(big.code, 'payload_too_large');
      boss.socket.send({ type: 'message', to: ['a', 'b', 'c', 'd'], payload: 1 });
      assert.equal((await boss.socket.next('error')).code, 'too_many_targets');
      for (let i = 0; i < 10; i++) boss.socket.send({ type: 'ping' });
      const limited = await boss.socket.next('error');
      assert.equal(limited.code, 'rate_limited');
      assert.ok(typeof limited.retry_after_ms === 'number' && limited.retry_after_ms > 0);
      await new Promise((resolve) => setTimeout(resolve, 1100));
      boss.socket.send({ type: 'ping' });
      await boss.socket.next('pong');
    } finally {
      await env.dispose();
    }
  });

  test('frames far over the limit close the socket with 1009', async () => {
    const env = await startTestRelay({ maxPayloadBytes: 4096 });
    try {
      const boss = await authBoss(env.relay);
      boss.socket.send('x'.repeat(200_000));
      assert.equal((await boss.socket.closed).code, 1009);
    } finally {
      await env.dispose();
    }
  });

  test('server_full at auth time past maxConnections; a replacing reconnect still works', async () => {
    const env = await startTestRelay({ maxConnections: 1 });
    try {
      const boss = await authBoss(env.relay);
      const extra = await connect(env.relay);
      extra.send({ type: 'auth', role: 'employee', name: 'x', tags: ['t'] });
      assert.equal((await extra.next('error')).code, 'server_full');
      assert.equal((await extra.closed).code, 4013);
      const replacing = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
      assert.equal(replacing.ok.type, 'auth_ok');
      await replacing.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('repeated auth failures from one address are refused for a while', async () => {
    const env = await startTestRelay({ maxAuthFailures: 3, throttleLoopback: true });
    try {
      for (let i = 0; i < 3; i++) {
        const socket = await connect(env.relay);
        socket.send({ type: 'auth', role: 'boss', authkey: 'wrong' });
        assert.equal((await socket.next('error')).code, 'invalid_authkey');
      }
      const socket = await connect(env.relay);
      socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
      const refused = await socket.next('error');
      assert.equal(refused.code, 'auth_throttled');
      assert.ok(Number(refused.retry_after_ms) > 0);
    } finally {
      await env.dispose();
    }
  });
});

describe('employee registration key', () => {
  test('with --employee-key an employee must present it to register; reconnects need only the identity', async () => {
    const env = await startTestRelay({ employeeKey: 'join-me' });
    try {
      const without = await connect(env.relay);
      without.send({ type: 'auth', role: 'employee', name: 'x', tags: ['t'] });
      assert.equal((await without.next('error')).code, 'invalid_employee_key');
      assert.equal((await without.closed).code, 4003);
      const worker = await authEmployee(env.relay, 'x', ['t'], { employee_key: 'join-me' });
      await worker.socket.close();
      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      await back.socket.close();
    } finally {
      await env.dispose();
    }
  });
});

describe('crash between the log write and the queue write', () => {
  test('a resend of a message whose queued copy never reached queue.db is routed again, not answered as a duplicate', singleRelayOnly('writes into the data dir of one relay'), async () => {
    let env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const worker = await authEmployee(env.relay);
      await Promise.all([boss.socket.close(), worker.socket.close()]);
      await env.relay.close();
      // What a kill -9 between the two writes leaves: the record says queued, queue.db has nothing.
      const line = {
        _id: 'crashrecord01',
        msg_id: 'lost-1',
        timestamp: Date.now(),
        from_id: boss.id,
        from_role: 'boss',
        targets: [{ id: worker.id, role: 'employee', status: 'queued', reason: null }],
        queued: [worker.id],
        payload_json: '"lost"',
      };
      const { appendFile } = await import('node:fs/promises');
      await appendFile(`${env.dataDir}/messages.db`, JSON.stringify(line) + '\n');
      env = await startTestRelay({}, env.dataDir);
      const again = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
      again.socket.send({ type: 'message', to: worker.id, payload: 'lost', msg_id: 'lost-1', queue: true });
      const ack = await again.socket.next('delivery_ack');
      assert.equal(ack.duplicate, undefined);
      assert.deepEqual(ack.queued, [worker.id]);
      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal((await back.socket.next('message')).payload, 'lost');
      await Promise.all([again.socket.close(), back.socket.close()]);
    } finally {
      await env.dispose();
    }
  });
});
