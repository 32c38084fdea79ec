// PROTOCOL.md A3: frames after auth, routing to id / array / broadcast, the forwarded
// envelope, delivery_ack and its failure reasons; errors that keep the connection usable.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { authBoss, authEmployee, http, startTestRelay, TEST_AUTHKEY, type Authed, type TestRelay } from './support';

describe('routing', () => {
  let env: TestRelay;
  let boss: Authed;
  let alice: Authed;
  let bob: Authed;
  before(async () => {
    env = await startTestRelay();
    boss = await authBoss(env.relay);
    alice = await authEmployee(env.relay, 'Alice', ['research']);
    bob = await authEmployee(env.relay, 'Bob', ['ops']);
  });
  after(async () => {
    await Promise.all([boss, alice, bob].map((a) => a.socket.close()));
    await env.dispose();
  });

  test('ping answers pong', async () => {
    alice.socket.send({ type: 'ping' });
    const pong = await alice.socket.next('pong');
    assert.equal(typeof pong.timestamp, 'number');
  });

  test('health_report is acknowledged; a non-boolean valid is an error', async () => {
    alice.socket.send({ type: 'health_report', valid: true, details: { load: 0.1 } });
    const ack = await alice.socket.next('health_report_ack');
    assert.equal(ack.id, alice.id);
    assert.equal(ack.valid, true);
    alice.socket.send({ type: 'health_report', valid: 'yes' });
    assert.equal((await alice.socket.next('error')).code, 'invalid_health_report');
  });

  test('boss to one employee: the exact envelope and ack', async () => {
    boss.socket.send({ type: 'message', to: alice.id, payload: { task: 'summarise', n: 1 }, msg_id: 'm-1' });
    const received = await alice.socket.next('message');
    assert.deepEqual(Object.keys(received).sort(), ['from_id', 'from_role', 'msg_id', 'payload', 'timestamp', 'to', 'type']);
    assert.equal(received.msg_id, 'm-1');
    assert.equal(received.from_id, boss.id);
    assert.equal(received.from_role, 'boss');
    assert.equal(received.to, alice.id);
    assert.deepEqual(received.payload, { task: 'summarise', n: 1 });
    const ack = await boss.socket.next('delivery_ack');
    assert.equal(ack.msg_id, 'm-1');
    assert.deepEqual(ack.delivered, [alice.id]);
    assert.deepEqual(ack.failed, []);
  });

  test('a message without msg_id gets a new uuid', async () => {
    boss.socket.send({ type: 'message', to: alice.id, payload: 'x' });
    const received = await alice.socket.next('message');
    assert.match(String(received.msg_id), /^[0-9a-f-]{36}$/);
    const ack = await boss.socket.next('delivery_ack');
    assert.equal(ack.msg_id, received.msg_id);
  });

  test('an array reaches each id; unknown ids fail with target_not_found', async () => {
    boss.socket.send({ type: 'message', to: [alice.id, bob.id, 'employee-ghost'], payload: 2 });
    assert.equal((await alice.socket.next('message')).to, alice.id);
    assert.equal((await bob.socket.next('message')).to, bob.id);
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual([...(ack.delivered as string[])].sort(), [alice.id, bob.id].sort());
    assert.deepEqual(ack.failed, [{ id: 'employee-ghost', reason: 'target_not_found' }]);
  });

  for (const to of ['*', 'all']) {
    test(`broadcast "${to}" reaches everyone online but the sender`, async () => {
      alice.socket.send({ type: 'message', to, payload: { hello: to } });
      assert.deepEqual((await bob.socket.next('message')).payload, { hello: to });
      assert.equal((await boss.socket.next('message')).from_id, alice.id);
      const ack = await alice.socket.next('delivery_ack');
      assert.ok(!(ack.delivered as string[]).includes(alice.id));
      assert.equal((ack.delivered as string[]).length, 2);
      assert.deepEqual(ack.failed, []);
      await assert.rejects(alice.socket.next((f) => f.type === 'message' && f.from_id === alice.id, 200));
    });
  }

  test('employee to boss, employee to employee and boss to boss', async () => {
    alice.socket.send({ type: 'message', to: boss.id, payload: 'done' });
    assert.equal((await boss.socket.next('message')).from_role, 'employee');
    await alice.socket.next('delivery_ack');
    alice.socket.send({ type: 'message', to: bob.id, payload: 'hi bob' });
    assert.equal((await bob.socket.next('message')).payload, 'hi bob');
    await alice.socket.next('delivery_ack');
    const boss2 = await authBoss(env.relay);
    boss.socket.send({ type: 'message', to: boss2.id, payload: 'hi boss' });
    assert.equal((await boss2.socket.next('message')).from_role, 'boss');
    await boss.socket.next('delivery_ack');
    await boss2.socket.close();
  });

  test('an offline target fails with target_offline', async () => {
    const carol = await authEmployee(env.relay, 'Carol', ['temp']);
    await carol.socket.close();
    boss.socket.send({ type: 'message', to: carol.id, payload: 1 });
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual(ack.failed, [{ id: carol.id, reason: 'target_offline' }]);
  });

  test('a banned target fails with target_banned', async () => {
    const dave = await authEmployee(env.relay, 'Dave', ['temp']);
    const ban = await http(env.relay, 'POST', `/employees/${dave.id}/ban`, { authkey: TEST_AUTHKEY });
    assert.equal(ban.status, 200);
    await dave.socket.closed;
    boss.socket.send({ type: 'message', to: dave.id, payload: 1 });
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual(ack.failed, [{ id: dave.id, reason: 'target_banned' }]);
  });

  const badFrames: [string, unknown, string][] = [
    ['text that is not JSON', 'hello there', 'invalid_json'],
    ['a JSON array', '[1,2]', 'invalid_json'],
    ['an object without type', '{"to":"*"}', 'invalid_json'],
    ['an unknown type', { type: 'dance' }, 'unsupported_type'],
    ['a message without to', { type: 'message', payload: 1 }, 'invalid_to'],
    ['a message with empty to', { type: 'message', to: '  ', payload: 1 }, 'invalid_to'],
    ['a message with an empty array', { type: 'message', to: [], payload: 1 }, 'invalid_to'],
    ['a message with a number to', { type: 'message', to: 42, payload: 1 }, 'invalid_to'],
  ];
  for (const [label, frame, code] of badFrames) {
    test(`${label} answers ${code} and the connection stays usable`, async () => {
      bob.socket.send(frame);
      const error = await bob.socket.next('error');
      assert.equal(error.code, code);
      assert.ok(String(error.message).length > 10);
      bob.socket.send({ type: 'ping' });
      await bob.socket.next('pong');
    });
  }
});
