// `mimiclaw-ws migrate`: a single relay's data dir moved into a cluster's Redis. The single relay
// and the cluster node run in this process; the migration is the built command, on a real
// redis-server the test starts.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startRelay } from '../server';
import { freePort, runToEnd } from './child-relay';
import { startRedis, type TestRedis } from './redis-harness';
import { authBoss, authEmployee, http, makeTempDir, reconnect, startTestRelay, TEST_AUTHKEY } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

let redis: TestRedis;

before(async () => {
  redis = await startRedis();
});

after(async () => {
  await redis.stop();
});

/** The command's environment, without a MIMICLAW_REDIS_URL or data dir of the machine running the tests. */
function cleanEnv(): NodeJS.ProcessEnv {
  const { MIMICLAW_REDIS_URL: _url, MIMICLAW_RELAY_HOME: _home, ...env } = process.env;
  return env;
}

function migrate(args: string[]) {
  return runToEnd(process.execPath, [CLI, 'migrate', ...args], cleanEnv());
}

/** queue.db's live entries in send order, as the single relay wrote them. */
async function queueFile(dataDir: string): Promise<{ target_id: string; record_id: string; expires_at: number }[]> {
  const live = new Map<string, { target_id: string; record_id: string; expires_at: number; seq: number }>();
  for (const line of (await fs.readFile(path.join(dataDir, 'queue.db'), 'utf8')).split('\n')) {
    if (line.trim() === '') continue;
    const doc = JSON.parse(line) as { _id: string; $$deleted?: boolean; target_id: string; record_id: string; expires_at: number; seq: number };
    if (doc.$$deleted) live.delete(doc._id);
    else live.set(doc._id, doc);
  }
  return [...live.values()].sort((a, b) => a.seq - b.seq);
}

describe('migrate: a single node into a cluster', () => {
  test('identities keep their ids and keys, bans hold, queued messages arrive in order on a cluster node', async () => {
    const single = await makeTempDir();
    const cluster = `m${process.pid}`;
    const relay = await startRelay({ port: 0, host: '127.0.0.1', authkey: TEST_AUTHKEY, dataDir: single, logLevel: 'silent' });
    let relayOpen = true;
    try {
      const boss = await authBoss(relay);
      const employee = await authEmployee(relay, 'Away', ['ops']);
      const banned = await authEmployee(relay, 'Rogue', ['ops']);
      assert.equal((await http(relay, 'POST', `/employees/${banned.id}/ban`, { authkey: TEST_AUTHKEY })).status, 200);
      await employee.socket.close();
      for (const n of [1, 2, 3]) {
        boss.socket.send({ type: 'message', to: employee.id, payload: { n }, queue: true, ttl_ms: 3_600_000, msg_id: `q-${n}` });
        assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [employee.id]);
      }

      // Refused while the relay holds the data dir; nothing is written.
      const held = await migrate(['--redis', redis.url, '--cluster', cluster, '--data-dir', single]);
      assert.equal(held.code, 1, held.stderr);
      assert.match(held.stderr, /in use by another relay \(pid \d+\): stop it first, then run migrate again\./);
      assert.equal(await redis.client.hlen(`${cluster}:identities`), 0);

      await boss.socket.close();
      await relay.close();
      relayOpen = false;
      const queuedOnDisk = await queueFile(single);
      assert.equal(queuedOnDisk.length, 3);

      const done = await migrate(['--redis', redis.url, '--cluster', cluster, '--data-dir', single]);
      assert.equal(done.code, 0, done.stderr);
      assert.match(done.stdout, /3 identities \(1 banned\), 3 queued messages for 1 target/);
      await fs.access(path.join(single, 'relay.lock')).then(
        () => assert.fail('relay.lock was left behind'),
        () => undefined,
      );
      // The copies keep their order and their expiry.
      const listed = (await redis.client.lrange(`${cluster}:queue:${employee.id}`, 0, -1)).map((text) => JSON.parse(text) as { record_id: string; expires_at: number });
      assert.deepEqual(
        listed.map(({ record_id, expires_at }) => ({ record_id, expires_at })),
        queuedOnDisk.map(({ record_id, expires_at }) => ({ record_id, expires_at })),
      );
      assert.equal(Number(await redis.client.zscore(`${cluster}:queue-expiry`, employee.id)), queuedOnDisk[0]!.expires_at);

      // A second run is refused unless --force, which overwrites identities and does not queue twice.
      const again = await migrate(['--redis', redis.url, '--cluster', cluster, '--data-dir', single]);
      assert.equal(again.code, 1, again.stderr);
      assert.match(again.stderr, /already has 3 of these 3 identities.*--force/);
      const forced = await migrate(['--redis', redis.url, '--cluster', cluster, '--data-dir', single, '--force']);
      assert.equal(forced.code, 0, forced.stderr);
      assert.match(forced.stdout, /3 identities \(1 banned, 3 overwritten\), 0 queued messages for 0 targets, 3 queued messages already in the cluster/);
      assert.equal(await redis.client.llen(`${cluster}:queue:${employee.id}`), 3);

      const node = await startTestRelay({ redisUrl: redis.url, clusterName: cluster, nodeId: 'node-a' });
      try {
        const back = await reconnect(node.relay, employee, 'employee');
        assert.equal(back.ok.type, 'auth_ok');
        assert.equal(back.ok.id, employee.id);
        for (const n of [1, 2, 3]) assert.deepEqual((await back.socket.next('message')).payload, { n });
        const refused = await reconnect(node.relay, banned, 'employee');
        assert.equal(refused.ok.type, 'error');
        assert.equal(refused.ok.code, 'banned');
        const bossBack = await reconnect(node.relay, boss, 'boss', { authkey: TEST_AUTHKEY });
        assert.equal(bossBack.ok.type, 'auth_ok');
        assert.equal(bossBack.ok.id, boss.id);
        await Promise.all([back.socket.close(), refused.socket.close(), bossBack.socket.close()]);
      } finally {
        await node.dispose();
      }
    } finally {
      if (relayOpen) await relay.close();
      await fs.rm(single, { recursive: true, force: true });
    }
  });
});

describe('migrate: command line', () => {
  test('bad arguments exit 2 naming the flag', async () => {
    const dir = await makeTempDir();
    try {
      const cases: [string[], RegExp][] = [
        [['--data-dir', dir], /missing --redis/],
        [['--redis', 'http://127.0.0.1:6379', '--data-dir', dir], /--redis must be a redis:\/\//],
        [['--redis', redis.url, '--cluster', 'no spaces', '--data-dir', dir], /--cluster must be/],
        [['--redis', redis.url, '--data-dir', dir, '--bogus'], /unknown option --bogus/],
        [['--redis', redis.url, '--redis', redis.url, '--data-dir', dir], /--redis was given more than once/],
      ];
      for (const [args, message] of cases) {
        const run = await migrate(args);
        assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
        assert.match(run.stderr, message);
        assert.match(run.stderr, /usage: mimiclaw-ws migrate/);
      }
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('an unreachable Redis exits 1 with one line and leaves the data dir unlocked', async () => {
    const dir = await makeTempDir();
    try {
      await fs.writeFile(path.join(dir, 'identities.db'), '');
      const run = await migrate(['--redis', `redis://127.0.0.1:${await freePort()}`, '--data-dir', dir]);
      assert.equal(run.code, 1, run.stderr);
      assert.equal(run.stderr.trim().split('\n').length, 1, run.stderr);
      assert.match(run.stderr, /^mimiclaw-ws migrate: Cannot reach Redis at redis:\/\/127\.0\.0\.1:\d+/);
      await assert.rejects(fs.access(path.join(dir, 'relay.lock')));
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  test('a data dir without identities.db is refused', async () => {
    const dir = await makeTempDir();
    try {
      const run = await migrate(['--redis', redis.url, '--data-dir', dir]);
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stderr, /No identities\.db in /);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
