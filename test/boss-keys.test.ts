// --boss-keys-file: named boss credentials beside the single authkey, each revocable alone by
// editing the file and sending SIGHUP, named in the log, the connection log and the admin views.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { BossKeysError, parseBossKeys } from '../lib/boss-keys';
import { parseCommandLine } from '../lib/cli-args';
import { createLogger } from '../lib/logger';
import { startRelay } from '../server';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { eventually } from './fault-support';

/** The socket's close code; fails instead of hanging when the relay does not close it. */
async function closeCode(socket: TestSocket, timeoutMs = 10_000): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`socket not closed within ${timeoutMs} ms`)), timeoutMs)));
  try {
    return (await Promise.race([socket.closed, timeout])).code;
  } finally {
    clearTimeout(timer);
  }
}
import { connect, http, makeTempDir, singleRelayOnly, startTestRelay, TEST_AUTHKEY, type Frame, type RelayEndpoint, type TestSocket } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');
const ALICE_KEY = 'alice-key-0123456789';
const BOB_KEY = 'bob-key-9876543210';
const sha256 = (text: string) => createHash('sha256').update(text).digest('hex');

/** alice in clear, bob as a hash, with a comment and blank lines. */
const TWO_KEYS = `# bosses of the ops team\n\nalice:${ALICE_KEY}\n  bob : sha256:${sha256(BOB_KEY)}\n\n`;

async function writeKeys(dir: string, text: string): Promise<string> {
  const file = path.join(dir, 'boss-keys');
  await fs.writeFile(file, text, { mode: 0o600 });
  return file;
}

/** A boss auth with `authkey`: its auth_ok, or the error frame and the close code. */
async function bossAuth(relay: RelayEndpoint, authkey: string): Promise<{ socket: TestSocket; frame: Frame }> {
  const socket = await connect(relay);
  socket.send({ type: 'auth', role: 'boss', authkey });
  return { socket, frame: await socket.next((f) => f.type === 'auth_ok' || f.type === 'error') };
}

describe('boss keys file format', () => {
  test('name:key and name:sha256:<hex>, comments and blank lines skipped', () => {
    const keys = parseBossKeys(TWO_KEYS, 'f');
    assert.deepEqual(keys.map((k) => [k.name, k.line, k.hash.toString('hex')]), [
      ['alice', 3, sha256(ALICE_KEY)],
      ['bob', 4, sha256(BOB_KEY)],
    ]);
    assert.deepEqual(parseBossKeys('# nothing yet\n', 'f'), []);
  });

  test('bad lines refuse the file, naming the line', () => {
    const refused = (text: string, ...patterns: RegExp[]) =>
      assert.throws(() => parseBossKeys(text, '/etc/keys'), (error: Error) => {
        assert.ok(error instanceof BossKeysError);
        assert.match(error.message, /\/etc\/keys/);
        for (const pattern of patterns) assert.match(error.message, pattern);
        return true;
      });
    refused('a:1\n# c\nb:2\na:3\n', /line 4/, /"a" is already used on line 1/);
    refused('a:same\nb:same\n', /line 2/, /same key as "a" on line 1/);
    refused(`a:sha256:${sha256('x')}\nb:x\n`, /line 2/, /same key as "a"/);
    refused('just-a-key\n', /line 1/, /name:key/);
    refused('a:\n', /line 1/, /no key/);
    refused('a b:key\n', /line 1/, /name/);
    refused('a:sha256:abc\n', /line 1/, /64 hex/);
    refused('authkey:other\n', /line 1/, /kept for the --authkey/);
  });

  test('--boss-keys-file is a flag; a relay with an unreadable or bad file does not start', async () => {
    const parsed = parseCommandLine(['8787', 'k', '--boss-keys-file', '/etc/mimiclaw/boss-keys']);
    assert.equal(parsed.kind === 'run' && parsed.options.bossKeysFile, '/etc/mimiclaw/boss-keys');
    const dir = await makeTempDir();
    try {
      const start = (bossKeysFile: string) => startRelay({ port: 0, host: '127.0.0.1', authkey: TEST_AUTHKEY, dataDir: dir, logLevel: 'silent', bossKeysFile });
      await assert.rejects(start(path.join(dir, 'missing')), /Cannot read the boss keys file .*missing \(ENOENT\)/);
      await assert.rejects(start(await writeKeys(dir, 'a:1\na:2\n')), /line 2: the name "a" is already used on line 1/);
      // The command says so in one line and exits 1.
      const exit = await runToEnd(process.execPath, [CLI, '0', TEST_AUTHKEY, path.join(dir, 'data'), '--boss-keys-file', path.join(dir, 'boss-keys')], { PATH: process.env.PATH, HOME: process.env.HOME });
      assert.equal(exit.code, 1);
      assert.equal(exit.stderr.trim().split('\n').length, 1, exit.stderr);
      assert.match(exit.stderr, /^mimiclaw-ws: Boss keys file .* line 2: the name "a" is already used on line 1/);
      assert.equal(exit.stdout, '', 'no ready line');
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('named boss keys on a running relay', () => {
  test('each key works beside the authkey, and the log, the connection log and the admin views name the credential', singleRelayOnly('reads connections.db in the data dir of one relay'), async () => {
    const dir = await makeTempDir();
    const lines: string[] = [];
    const logger = createLogger('info', (line) => lines.push(line));
    const env = await startTestRelay({ logger, bossKeysFile: await writeKeys(dir, TWO_KEYS) }, dir);
    try {
      const ids: Record<string, string> = {};
      for (const [name, key] of [['alice', ALICE_KEY], ['bob', BOB_KEY], ['authkey', TEST_AUTHKEY]] as const) {
        const { socket, frame } = await bossAuth(env.relay, key);
        assert.equal(frame.type, 'auth_ok', `${name}: ${JSON.stringify(frame)}`);
        ids[name] = String(frame.id);
        // A reconnect presents a credential again, and may use another one.
        await socket.close();
      }
      const wrong = await bossAuth(env.relay, 'not-a-key');
      assert.equal(wrong.frame.code, 'invalid_authkey');
      assert.equal(await closeCode(wrong.socket), 4003);

      const logged = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.event === 'auth_ok');
      for (const name of ['alice', 'bob', 'authkey']) {
        assert.ok(logged.some((l) => l.id === ids[name] && l.credential === name), `auth_ok log line for ${name}: ${JSON.stringify(logged)}`);
      }
      for (const line of lines) {
        assert.ok(!line.includes(ALICE_KEY) && !line.includes(BOB_KEY) && !line.includes(TEST_AUTHKEY), `a key in the log: ${line}`);
      }

      const { body } = await http(env.relay, 'GET', '/api/admin/workforce');
      const bosses = body.bosses as { id: string; credential: string | null }[];
      for (const name of ['alice', 'bob', 'authkey']) assert.equal(bosses.find((b) => b.id === ids[name])?.credential, name);
      const { body: connections } = await http(env.relay, 'GET', '/api/connections');
      const listed = connections.connections as { id: string; credential?: string | null }[];
      assert.equal(listed.find((n) => n.id === ids.bob)?.credential, 'bob');

      await env.relay.close();
      const events = (await fs.readFile(path.join(dir, 'connections.db'), 'utf8'))
        .split('\n')
        .filter((l) => l.trim() !== '')
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      for (const name of ['alice', 'bob', 'authkey']) {
        assert.ok(events.some((e) => e.event === 'auth_ok' && e.identityId === ids[name] && e.credential === name), `connections.db auth_ok for ${name}`);
      }
    } finally {
      await env.dispose();
    }
  });

  test('reload: a removed key is refused and its sessions closed with 4009, the others stay; a bad file keeps the keys in use', async () => {
    const dir = await makeTempDir();
    const file = await writeKeys(dir, TWO_KEYS);
    const env = await startTestRelay({ bossKeysFile: file }, dir);
    try {
      const alice = await bossAuth(env.relay, ALICE_KEY);
      const bob = await bossAuth(env.relay, BOB_KEY);
      const admin = await bossAuth(env.relay, TEST_AUTHKEY);
      assert.equal(bob.frame.type, 'auth_ok');

      await fs.writeFile(file, 'alice:broken\nalice:twice\n');
      const failed = await env.relay.reload();
      assert.ok(failed.bossKeys !== 'off' && failed.bossKeys.error !== null && /line 2/.test(failed.bossKeys.error));
      assert.equal((await bossAuth(env.relay, BOB_KEY)).frame.type, 'auth_ok', 'a bad file keeps the keys in use');

      await fs.writeFile(file, `alice:${ALICE_KEY}\ncarol:carol-key\n`);
      const result = await env.relay.reload();
      assert.deepEqual(result.bossKeys, { added: ['carol'], removed: ['bob'], changed: [], error: null });
      const notice = await bob.socket.next('system');
      assert.equal(notice.event, 'credentials_revoked');
      assert.equal(await closeCode(bob.socket), 4009);
      assert.equal((await bossAuth(env.relay, BOB_KEY)).frame.code, 'invalid_authkey');
      // Bob's identity cannot come back either: a reconnect presents a boss credential too.
      const bobBack = await connect(env.relay);
      bobBack.send({ type: 'auth', role: 'boss', authkey: BOB_KEY, identity: { id: bob.frame.id, key: bob.frame.key } });
      assert.equal((await bobBack.next('error')).code, 'invalid_authkey');

      for (const key of [ALICE_KEY, 'carol-key', TEST_AUTHKEY]) assert.equal((await bossAuth(env.relay, key)).frame.type, 'auth_ok');
      // Sessions of the keys that stayed are still open: a ping still gets its pong.
      for (const kept of [alice, admin]) {
        kept.socket.send({ type: 'ping' });
        assert.equal((await kept.socket.next('pong')).type, 'pong');
      }
    } finally {
      await env.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a wrong boss key counts toward the auth-failure throttle like a wrong authkey', async () => {
    const dir = await makeTempDir();
    const env = await startTestRelay({ bossKeysFile: await writeKeys(dir, TWO_KEYS), maxAuthFailures: 2, throttleLoopback: true }, dir);
    try {
      for (let i = 0; i < 2; i++) assert.equal((await bossAuth(env.relay, `guess-${i}`)).frame.code, 'invalid_authkey');
      const refused = await bossAuth(env.relay, ALICE_KEY);
      assert.equal(refused.frame.code, 'auth_throttled');
    } finally {
      await env.dispose();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('the command rereads the file on SIGHUP: the removed key stops working, the other and --authkey go on', async () => {
    const dir = await makeTempDir();
    const file = await writeKeys(dir, TWO_KEYS);
    const port = await freePort();
    const relay = new ChildRelay(process.execPath, [CLI, String(port), TEST_AUTHKEY, path.join(dir, 'data'), '--host', '127.0.0.1', '--boss-keys-file', file], { PATH: process.env.PATH, HOME: process.env.HOME }, port);
    try {
      await relay.waitForHealth();
      const endpoint = { url: relay.wsUrl, httpUrl: relay.httpUrl };
      const bob = await bossAuth(endpoint, BOB_KEY);
      assert.equal(bob.frame.type, 'auth_ok');
      await eventually('the auth is logged with its credential', () => relay.stderr.includes('"credential":"bob"'));

      await fs.writeFile(file, `alice:${ALICE_KEY}\n`);
      relay.child.kill('SIGHUP');
      await eventually('the file is reread', () => relay.stderr.includes('"boss_keys_reloaded"'));
      assert.equal(await closeCode(bob.socket), 4009);
      assert.equal((await bossAuth(endpoint, BOB_KEY)).frame.code, 'invalid_authkey');
      assert.equal((await bossAuth(endpoint, ALICE_KEY)).frame.type, 'auth_ok');
      assert.equal((await bossAuth(endpoint, TEST_AUTHKEY)).frame.type, 'auth_ok');
    } finally {
      await relay.stop('SIGTERM');
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
