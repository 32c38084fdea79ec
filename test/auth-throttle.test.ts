// The auth-failure throttle (README "Limits", --max-auth-failures, --throttle-loopback): only
// wrong secrets count, per address and per secret guessed at, and loopback is exempt unless asked.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { helpText, parseCommandLine } from '../lib/cli-args';
import { authBoss, authEmployee, connect, reconnect, startTestRelay, TEST_AUTHKEY, type Frame, type TestRelay } from './support';

/** One auth on a fresh socket; the relay's answer (auth_ok or error) and, for an error, the close code. */
async function tryAuth(env: TestRelay, fields: Record<string, unknown>): Promise<{ answer: Frame; closeCode: number | null }> {
  const socket = await connect(env.relay);
  socket.send({ type: 'auth', ...fields });
  const answer = await socket.next((f) => f.type === 'auth_ok' || f.type === 'error');
  if (answer.type === 'auth_ok') {
    await socket.close();
    return { answer, closeCode: null };
  }
  return { answer, closeCode: (await socket.closed).code };
}

async function expectCode(env: TestRelay, fields: Record<string, unknown>, code: string): Promise<Frame> {
  const { answer, closeCode } = await tryAuth(env, fields);
  assert.equal(answer.type === 'error' ? answer.code : answer.type, code, `auth ${JSON.stringify(fields)} answered ${JSON.stringify(answer)}`);
  if (code !== 'auth_ok') assert.equal(closeCode, 4003);
  return answer;
}

describe('auth-failure throttle', () => {
  test('by default loopback is not throttled: many wrong secrets, then good bosses and employees still connect', async () => {
    const env = await startTestRelay();
    try {
      const known = await authEmployee(env.relay, 'Known', ['k']);
      await known.socket.close();
      // Well past the default limit of 20, as a misconfigured agent on the same host would send.
      for (let i = 0; i < 30; i++) await expectCode(env, { role: 'boss', authkey: `wrong-${i}` }, 'invalid_authkey');
      for (let i = 0; i < 25; i++) await expectCode(env, { role: 'employee', identity: { id: known.id, key: `wrong-${i}` } }, 'invalid_identity_key');
      const boss = await authBoss(env.relay);
      const employees = await Promise.all([1, 2, 3].map((n) => authEmployee(env.relay, `Good-${n}`, ['good'])));
      const back = await reconnect(env.relay, known, 'employee');
      assert.equal(back.ok.type, 'auth_ok');
      await Promise.all([boss.socket.close(), back.socket.close(), ...employees.map((e) => e.socket.close())]);
    } finally {
      await env.dispose();
    }
  });

  test('with throttleLoopback, wrong keys for one identity throttle only that identity; malformed and invalid auths never count', async () => {
    const env = await startTestRelay({ throttleLoopback: true, maxAuthFailures: 3 });
    try {
      const target = await authEmployee(env.relay, 'Target', ['t']);
      const other = await authEmployee(env.relay, 'Other', ['o']);
      await Promise.all([target.socket.close(), other.socket.close()]);

      // Twice the limit of every mistake that is not a wrong secret.
      const notGuesses: [Record<string, unknown>, string][] = [
        [{ role: 'admin' }, 'invalid_role'],
        [{ role: 'employee', name: '  ', tags: ['x'] }, 'invalid_name'],
        [{ role: 'employee', name: 'x', tags: [] }, 'invalid_tags'],
        [{ role: 'employee', identity: { id: target.id } }, 'invalid_identity'],
        [{ role: 'employee', identity: { id: 'employee-nobody', key: 'k' } }, 'identity_not_found'],
        [{ role: 'boss', authkey: TEST_AUTHKEY, identity: { id: target.id, key: target.key } }, 'role_mismatch'],
        [{ role: 'boss' }, 'invalid_authkey'],
      ];
      for (let round = 0; round < 6; round++) {
        for (const [fields, code] of notGuesses) await expectCode(env, fields, code);
        const socket = await connect(env.relay);
        socket.send('{"type":"auth",');
        assert.equal((await socket.next('error')).code, 'invalid_json');
        socket.send('[' + '['.repeat(200));
        assert.equal((await socket.next('error')).code, 'invalid_json');
        await socket.close();
      }
      await expectCode(env, { role: 'boss', authkey: TEST_AUTHKEY }, 'auth_ok');
      await expectCode(env, { role: 'employee', identity: { id: target.id, key: target.key } }, 'auth_ok');

      // Wrong keys for one identity: that identity, and nothing else, is throttled.
      for (let i = 0; i < 3; i++) await expectCode(env, { role: 'employee', identity: { id: target.id, key: `guess-${i}` } }, 'invalid_identity_key');
      const refused = await expectCode(env, { role: 'employee', identity: { id: target.id, key: target.key } }, 'auth_throttled');
      assert.ok(Number(refused.retry_after_ms) > 0, 'auth_throttled says when to retry');
      assert.match(String(refused.message), new RegExp(`identity ${target.id}`));
      await expectCode(env, { role: 'employee', identity: { id: other.id, key: other.key } }, 'auth_ok');
      await expectCode(env, { role: 'boss', authkey: TEST_AUTHKEY }, 'auth_ok');
      await expectCode(env, { role: 'employee', name: 'Newcomer', tags: ['n'] }, 'auth_ok');

      // Wrong authkeys throttle auths that present an authkey, not identity reconnects without one.
      for (let i = 0; i < 3; i++) await expectCode(env, { role: 'boss', authkey: `guess-${i}` }, 'invalid_authkey');
      await expectCode(env, { role: 'boss', authkey: TEST_AUTHKEY }, 'auth_throttled');
      await expectCode(env, { role: 'employee', identity: { id: other.id, key: other.key } }, 'auth_ok');
    } finally {
      await env.dispose();
    }
  });

  test('with throttleLoopback, wrong employee keys throttle registration only', async () => {
    const env = await startTestRelay({ throttleLoopback: true, maxAuthFailures: 2, employeeKey: 'join-me' });
    try {
      const worker = await authEmployee(env.relay, 'Worker', ['w'], { employee_key: 'join-me' });
      await worker.socket.close();
      for (let i = 0; i < 4; i++) await expectCode(env, { role: 'employee', name: 'x', tags: ['t'] }, 'invalid_employee_key');
      for (let i = 0; i < 2; i++) await expectCode(env, { role: 'employee', name: 'x', tags: ['t'], employee_key: `guess-${i}` }, 'invalid_employee_key');
      await expectCode(env, { role: 'employee', name: 'x', tags: ['t'], employee_key: 'join-me' }, 'auth_throttled');
      await expectCode(env, { role: 'employee', identity: { id: worker.id, key: worker.key } }, 'auth_ok');
      await expectCode(env, { role: 'boss', authkey: TEST_AUTHKEY }, 'auth_ok');
    } finally {
      await env.dispose();
    }
  });

  test('--throttle-loopback is a switch that sets throttleLoopback, listed in --help', () => {
    const parsed = parseCommandLine(['8787', 'k', '--throttle-loopback'], {});
    assert.equal(parsed.kind === 'run' && parsed.options.throttleLoopback, true);
    const plain = parseCommandLine(['8787', 'k'], {});
    assert.equal(plain.kind === 'run' && plain.options.throttleLoopback, undefined);
    assert.match(helpText('0'), /--throttle-loopback/);
  });
});
