// PROTOCOL.md A1, A2, A4: handshake, auth forms, every auth error and close code.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { authBoss, authEmployee, connect, reconnect, startTestRelay, TestSocket, TEST_AUTHKEY, type TestRelay } from './support';

describe('handshake and auth', () => {
  let env: TestRelay;
  before(async () => {
    env = await startTestRelay();
  });
  after(() => env.dispose());

  test('hello on open describes the auth schema', async () => {
    const socket = new TestSocket(env.relay.url);
    const hello = await socket.next('hello');
    assert.equal(hello.message, 'Please authenticate');
    assert.equal(typeof hello.schema, 'object');
    assert.equal(typeof hello.timestamp, 'number');
    await socket.close();
  });

  test('upgrades on another path are refused', async () => {
    const ws = new WebSocket(env.relay.url.replace('/ws', '/other'));
    const status = await new Promise<number>((resolve) => {
      ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
      ws.on('error', () => resolve(-1));
    });
    assert.equal(status, 404);
  });

  test('a boss authenticates with the authkey', async () => {
    const socket = await connect(env.relay);
    socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
    const ok = await socket.next('auth_ok');
    assert.match(String(ok.id), /^boss-[0-9a-f-]{36}$/);
    assert.equal(typeof ok.key, 'string');
    assert.equal(ok.role, 'boss');
    assert.equal(ok.name, null);
    assert.deepEqual(ok.tags, []);
    assert.equal(ok.reconnected, false);
    await socket.close();
  });

  test('an employee registers with trimmed, de-duplicated tags', async () => {
    const { socket, id } = await authEmployee(env.relay, '  Researcher-1 ', ['research', ' risk ', 'research']);
    assert.match(id, /^employee-/);
    socket.send({ type: 'ping' });
    await socket.next('pong');
    const again = await reconnect(env.relay, { id, key: 'wrong' }, 'employee');
    assert.equal(again.ok.code, 'invalid_identity_key');
    await socket.close();
  });

  test('auth_ok carries the employee name and tags', async () => {
    const socket = await connect(env.relay);
    socket.send({ type: 'auth', role: 'employee', name: ' Ana ', tags: ['a', ' b', 'a'], meta: { v: 1 } });
    const ok = await socket.next('auth_ok');
    assert.equal(ok.name, 'Ana');
    assert.deepEqual(ok.tags, ['a', 'b']);
    await socket.close();
  });

  const rejections: [string, Record<string, unknown>, string][] = [
    ['unknown role', { role: 'admin' }, 'invalid_role'],
    ['missing role', {}, 'invalid_role'],
    ['boss without key', { role: 'boss' }, 'invalid_authkey'],
    ['boss with wrong key', { role: 'boss', authkey: 'nope' }, 'invalid_authkey'],
    ['employee with wrong key', { role: 'employee', authkey: 'nope', name: 'x', tags: ['t'] }, 'invalid_authkey'],
    ['employee without name', { role: 'employee', tags: ['t'] }, 'invalid_name'],
    ['employee with blank name', { role: 'employee', name: '   ', tags: ['t'] }, 'invalid_name'],
    ['employee without tags', { role: 'employee', name: 'x' }, 'invalid_tags'],
    ['employee with empty tags', { role: 'employee', name: 'x', tags: [] }, 'invalid_tags'],
    ['employee with a blank tag', { role: 'employee', name: 'x', tags: ['ok', '  '] }, 'invalid_tags'],
    ['employee with a number tag', { role: 'employee', name: 'x', tags: ['ok', 5] }, 'invalid_tags'],
    ['identity without key', { role: 'employee', identity: { id: 'employee-x' } }, 'invalid_identity'],
    ['identity not an object', { role: 'employee', identity: 'employee-x' }, 'invalid_identity'],
    ['unknown identity', { role: 'employee', identity: { id: 'employee-nope', key: 'k' } }, 'identity_not_found'],
  ];
  for (const [label, fields, code] of rejections) {
    test(`rejects ${label} with ${code} and close 4003`, async () => {
      const socket = await connect(env.relay);
      socket.send({ type: 'auth', ...fields });
      const error = await socket.next('error');
      assert.equal(error.code, code);
      assert.equal(typeof error.message, 'string');
      assert.ok(String(error.message).length > 10);
      const closed = await socket.closed;
      assert.equal(closed.code, 4003);
    });
  }

  test('an employee may send the right authkey', async () => {
    const { socket } = await authEmployee(env.relay, 'Keyed', ['k'], { authkey: TEST_AUTHKEY });
    await socket.close();
  });

  test('frames before auth get auth_required and are not acted on', async () => {
    const socket = await connect(env.relay);
    socket.send({ type: 'message', to: '*', payload: 1 });
    assert.equal((await socket.next('error')).code, 'auth_required');
    socket.send('not json');
    assert.equal((await socket.next('error')).code, 'invalid_json');
    socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
    await socket.next('auth_ok');
    await socket.close();
  });

  test('reconnect restores the identity and role checks hold', async () => {
    const boss = await authBoss(env.relay);
    await boss.socket.close();
    const again = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    assert.equal(again.ok.type, 'auth_ok');
    assert.equal(again.ok.id, boss.id);
    assert.equal(again.ok.key, boss.key);
    assert.equal(again.ok.reconnected, true);
    await again.socket.close();

    const employee = await authEmployee(env.relay);
    await employee.socket.close();
    const wrongRole = await reconnect(env.relay, employee, 'boss', { authkey: TEST_AUTHKEY });
    assert.equal(wrongRole.ok.code, 'role_mismatch');
    assert.equal((await wrongRole.socket.closed).code, 4003);
  });

  test('a boss reconnect needs the authkey too; the error says whether it is missing or wrong', async () => {
    const boss = await authBoss(env.relay);
    await boss.socket.close();
    const missing = await reconnect(env.relay, boss, 'boss');
    assert.equal(missing.ok.code, 'invalid_authkey');
    assert.match(String(missing.ok.message), /authkey is missing/);
    assert.equal((await missing.socket.closed).code, 4003);
    const wrong = await reconnect(env.relay, boss, 'boss', { authkey: 'nope' });
    assert.equal(wrong.ok.code, 'invalid_authkey');
    assert.match(String(wrong.ok.message), /not right/);
    assert.equal((await wrong.socket.closed).code, 4003);
    const right = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
    assert.equal(right.ok.type, 'auth_ok');
    assert.equal(right.ok.reconnected, true);
    await right.socket.close();
  });

  test('an employee reconnect may change its name and tags', async () => {
    const employee = await authEmployee(env.relay, 'Old', ['one']);
    await employee.socket.close();
    const again = await reconnect(env.relay, employee, 'employee', { name: 'New', tags: ['two', 'three'] });
    assert.equal(again.ok.name, 'New');
    assert.deepEqual(again.ok.tags, ['two', 'three']);
    const bad = await reconnect(env.relay, employee, 'employee', { tags: [1] });
    assert.equal(bad.ok.code, 'invalid_tags');
    await again.socket.close();
  });

  test('a newer session of the same identity closes the older one with 4000', async () => {
    const first = await authEmployee(env.relay);
    const second = await reconnect(env.relay, first, 'employee');
    assert.equal(second.ok.type, 'auth_ok');
    assert.equal((await first.socket.closed).code, 4000);
    second.socket.send({ type: 'ping' });
    await second.socket.next('pong');
    await second.socket.close();
  });

  test('a second auth frame after success is unsupported', async () => {
    const boss = await authBoss(env.relay);
    boss.socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
    assert.equal((await boss.socket.next('error')).code, 'unsupported_type');
    await boss.socket.close();
  });
});

describe('auth timeout', () => {
  test('a socket that does not authenticate in time is closed with 4001', async () => {
    const env = await startTestRelay({ authTimeoutMs: 200 });
    try {
      const socket = await connect(env.relay);
      assert.equal((await socket.closed).code, 4001);
    } finally {
      await env.dispose();
    }
  });
});
