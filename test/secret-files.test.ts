// Keys from files (--authkey-file, --employee-key-file, env MIMICLAW_AUTHKEY_FILE): read at start
// and on reload/SIGHUP, a new key asked of new auths while authenticated connections stay, a
// file that cannot be read keeping the keys in use, and a warning for a file others can read.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseCommandLine, UsageError } from '../lib/cli-args';
import { startRelay, type RelayHandle } from '../server';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { authBoss, connect, http, makeTempDir, type Frame } from './support';
import { capturingLogger, waitUntil } from './tls-support';

const CLI = path.join(__dirname, '..', 'cli.js');
const childEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, HOME: process.env.HOME, ...extra });

/** One auth attempt: the frame the relay answers with (auth_ok or error). */
async function tryAuth(relay: { url: string; httpUrl: string }, frame: Record<string, unknown>): Promise<Frame> {
  const socket = await connect(relay);
  socket.send({ type: 'auth', ...frame });
  const answer = await socket.next((f) => f.type === 'auth_ok' || f.type === 'error');
  await socket.close();
  return answer;
}

describe('keys from files, in process', () => {
  let dir: string;
  let authkeyFile: string;
  let employeeKeyFile: string;
  let relay: RelayHandle;
  const log = capturingLogger();
  before(async () => {
    dir = await makeTempDir('mimiclaw-keys-');
    authkeyFile = path.join(dir, 'authkey');
    employeeKeyFile = path.join(dir, 'employee-key');
    await fs.writeFile(authkeyFile, 'first-authkey\n', { mode: 0o600 });
    await fs.writeFile(employeeKeyFile, 'first-employee-key', { mode: 0o640 });
    relay = await startRelay({ port: 0, host: '127.0.0.1', dataDir: path.join(dir, 'data'), logger: log.logger, authkeyFile, employeeKeyFile });
  });
  after(async () => {
    await relay.close();
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('the keys are read from the files (less the trailing newline) and nothing else is accepted', async () => {
    assert.equal((await tryAuth(relay, { role: 'boss', authkey: 'first-authkey' })).type, 'auth_ok');
    assert.equal((await tryAuth(relay, { role: 'boss', authkey: 'first-authkey\n' })).code, 'invalid_authkey');
    assert.equal((await tryAuth(relay, { role: 'employee', name: 'W', tags: ['a'], employee_key: 'first-employee-key' })).type, 'auth_ok');
    assert.equal((await tryAuth(relay, { role: 'employee', name: 'W', tags: ['a'], employee_key: 'nope' })).code, 'invalid_employee_key');
    // 0600 and 0640 draw no warning.
    assert.equal(log.lines.filter((l) => l.event === 'secret_file_exposed').length, 0);
  });

  test('reload() takes new keys for new auths; a connection authenticated before stays', async () => {
    const before = await authBoss(relay, 'first-authkey');
    await fs.writeFile(authkeyFile, 'second-authkey\n');
    await fs.writeFile(employeeKeyFile, 'second-employee-key\n');
    const result = await relay.reload();
    assert.deepEqual(result.keys, { changed: ['authkey', 'employee_key'], error: null });
    assert.equal(result.certificate, 'off');
    assert.equal((await tryAuth(relay, { role: 'boss', authkey: 'first-authkey' })).code, 'invalid_authkey');
    assert.equal((await tryAuth(relay, { role: 'boss', authkey: 'second-authkey' })).type, 'auth_ok');
    assert.equal((await tryAuth(relay, { role: 'employee', name: 'W', tags: ['a'], employee_key: 'first-employee-key' })).code, 'invalid_employee_key');
    assert.equal((await tryAuth(relay, { role: 'employee', name: 'W', tags: ['a'], employee_key: 'second-employee-key' })).type, 'auth_ok');
    // The admin API asks for the new key too.
    assert.equal((await http(relay, 'POST', '/employees/employee-x/ban', { body: { banned: true }, authkey: 'first-authkey' })).status, 401);
    // With the new key it gets past the key check to the unknown id.
    assert.equal((await http(relay, 'POST', '/employees/employee-x/ban', { body: { banned: true }, authkey: 'second-authkey' })).status, 404);
    // The boss that authenticated with the old key is still connected and can send.
    before.socket.send({ type: 'message', to: '*', payload: 'still here', msg_id: 'k-1' });
    assert.equal((await before.socket.next('delivery_ack')).msg_id, 'k-1');
    await before.socket.close();
    assert.doesNotMatch(log.text(), /first-authkey|second-authkey|first-employee-key|second-employee-key/);
  });

  test('a key file that cannot be read on reload is logged and every key in use is kept', async () => {
    await fs.writeFile(authkeyFile, '');
    const empty = await relay.reload();
    assert.match(String(empty.keys.error), /authkey file .* must hold the key on one line \(it is empty\)/);
    await fs.rm(employeeKeyFile);
    const missing = await relay.reload();
    assert.match(String(missing.keys.error), /Cannot read the employee key file .*\(ENOENT\)/);
    assert.equal((await tryAuth(relay, { role: 'boss', authkey: 'second-authkey' })).type, 'auth_ok');
    assert.equal((await tryAuth(relay, { role: 'employee', name: 'W', tags: ['a'], employee_key: 'second-employee-key' })).type, 'auth_ok');
    assert.equal(log.lines.filter((l) => l.event === 'key_files_reload_failed' && l.level === 'error').length, 2);
  });

  test('a key file other users can read draws a warning naming the file and its mode, never the key', async () => {
    await fs.writeFile(authkeyFile, 'third-authkey\n');
    await fs.chmod(authkeyFile, 0o644);
    await fs.writeFile(employeeKeyFile, 'third-employee-key\n', { mode: 0o600 });
    assert.deepEqual((await relay.reload()).keys.error, null);
    const warnings = log.lines.filter((l) => l.event === 'secret_file_exposed');
    assert.equal(warnings.length, 1);
    assert.equal(warnings[0]!.level, 'warn');
    assert.equal(warnings[0]!.file, authkeyFile);
    assert.equal(warnings[0]!.mode, '0644');
    assert.match(String(warnings[0]!.message), /chmod 600/);
    assert.doesNotMatch(log.text(), /third-authkey/);
  });
});

describe('keys from files, the command', () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir('mimiclaw-keys-cli-');
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('MIMICLAW_AUTHKEY_FILE at start, a new key after SIGHUP, the relay still running', async () => {
    const keyFile = path.join(dir, 'authkey');
    await fs.writeFile(keyFile, 'cli-first\n', { mode: 0o600 });
    const port = await freePort();
    const relay = new ChildRelay(process.execPath, [CLI, '--port', String(port), '--host', '127.0.0.1', '--data-dir', path.join(dir, 'data')], childEnv({ MIMICLAW_AUTHKEY_FILE: keyFile }), port);
    const endpoint = { url: relay.wsUrl, httpUrl: relay.httpUrl };
    try {
      await relay.waitForHealth();
      assert.equal((await tryAuth(endpoint, { role: 'boss', authkey: 'cli-first' })).type, 'auth_ok');
      await fs.writeFile(keyFile, 'cli-second\n');
      relay.child.kill('SIGHUP');
      await waitUntil('the relay logs the reload', () => relay.stderr.includes('"event":"key_files_reloaded"'));
      assert.equal((await tryAuth(endpoint, { role: 'boss', authkey: 'cli-second' })).type, 'auth_ok');
      assert.equal((await tryAuth(endpoint, { role: 'boss', authkey: 'cli-first' })).code, 'invalid_authkey');
      assert.equal(relay.child.exitCode, null);
      assert.doesNotMatch(relay.stderr, /cli-first|cli-second/);
      assert.equal((await relay.stop('SIGTERM')).code, 0);
    } finally {
      if (relay.child.exitCode === null) relay.child.kill('SIGKILL');
    }
  });

  test('a missing or empty key file stops the start with a line naming it', async () => {
    const missing = await runToEnd(process.execPath, [CLI, '0', '--host', '127.0.0.1', '--data-dir', path.join(dir, 'data2'), '--authkey-file', path.join(dir, 'nope')], childEnv());
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /Cannot read the authkey file .*nope \(ENOENT\)/);
    const emptyFile = path.join(dir, 'empty');
    await fs.writeFile(emptyFile, '\n', { mode: 0o600 });
    const empty = await runToEnd(process.execPath, [CLI, '0', '--host', '127.0.0.1', '--data-dir', path.join(dir, 'data2'), '--employee-key-file', emptyFile], childEnv({ MIMICLAW_AUTHKEY: 'k' }));
    assert.equal(empty.code, 1);
    assert.match(empty.stderr, /The employee key file .*empty must hold the key on one line \(it is empty\)/);
  });

  test('flags and env: a flag beats env, a key and its file together are refused', () => {
    const run = (argv: string[], env: NodeJS.ProcessEnv) => {
      const parsed = parseCommandLine(argv, env);
      assert.equal(parsed.kind, 'run');
      return parsed.kind === 'run' ? parsed.options : undefined;
    };
    assert.deepEqual(
      [run(['--authkey-file', '/k'], {})?.authkeyFile, run(['--authkey-file', '/k'], {})?.authkey],
      ['/k', undefined],
    );
    assert.equal(run([], { MIMICLAW_AUTHKEY_FILE: '/env-k' })?.authkeyFile, '/env-k');
    assert.equal(run(['8787', 'positional'], { MIMICLAW_AUTHKEY_FILE: '/env-k' })?.authkeyFile, undefined);
    assert.equal(run(['--authkey-file', '/k'], { MIMICLAW_AUTHKEY: 'env' })?.authkey, undefined);
    assert.equal(run(['--authkey', 'k'], { MIMICLAW_EMPLOYEE_KEY_FILE: '/e' })?.employeeKeyFile, '/e');
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--authkey-file', '/k'], {}), (e: unknown) => e instanceof UsageError && /--authkey-file, not both/.test(e.message));
    assert.throws(() => parseCommandLine(['8787', 'k', '--authkey-file', '/k'], {}), UsageError);
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--employee-key', 'e', '--employee-key-file', '/e'], {}), /--employee-key-file, not both/);
    assert.throws(() => parseCommandLine([], { MIMICLAW_AUTHKEY: 'a', MIMICLAW_AUTHKEY_FILE: '/a' }), /Set MIMICLAW_AUTHKEY or MIMICLAW_AUTHKEY_FILE, not both/);
    assert.throws(() => parseCommandLine([], {}), /--authkey-file <path>/);
    assert.throws(() => parseCommandLine(['--authkey-file'], {}), /--authkey-file needs a value/);
  });
});
