// TLS on the relay's own port: wss:// and https:// with a throwaway certificate, reached by
// RelayClient, `mimiclaw-ws connect`/`send`, `mimiclaw-ws health` and curl; a renewed
// certificate served without a restart (reload(), the periodic check, SIGHUP to the CLI); a bad
// renewal keeping the certificate in use.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { RelayClient } from '../client';
import { startRelay } from '../server';
import { ChildRelay, freePort, runToEnd } from './child-relay';
import { makeTempDir, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';
import { capturingLogger, httpsGet, makeCertificate, presentedFingerprint, renewInPlace, waitUntil, within, type TestCertificate } from './tls-support';

const CLI = path.join(__dirname, '..', 'cli.js');
const childEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, HOME: process.env.HOME, ...extra });

describe('TLS: wss:// and https:// on one port', () => {
  let dir: string;
  let first: TestCertificate;
  let env: TestRelay;
  before(async () => {
    dir = await makeTempDir('mimiclaw-tls-');
    first = await makeCertificate(dir, 'first');
    env = await startTestRelay({ tlsCertFile: first.certFile, tlsKeyFile: first.keyFile });
  });
  after(async () => {
    await env.dispose();
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('the handle gives wss:// and https:// URLs, and /health answers over https', async () => {
    assert.match(env.relay.url, /^wss:\/\/127\.0\.0\.1:\d+\/ws$/);
    assert.match(env.relay.httpUrl, /^https:\/\/127\.0\.0\.1:\d+$/);
    const health = await httpsGet(`${env.relay.httpUrl}/health`, first.cert);
    assert.equal(health.status, 200);
    assert.equal((JSON.parse(health.body) as { ok: boolean }).ok, true);
  });

  test('RelayClient boss and employee talk over wss:// when given the certificate as ca', async () => {
    assert.match(env.relay.url, /^wss:/);
    const worker = new RelayClient({ url: env.relay.url, role: 'employee', name: 'Tls-1', tags: ['tls'], ca: first.cert, heartbeatIntervalMs: 0 });
    const boss = new RelayClient({ url: env.relay.url, role: 'boss', authkey: TEST_AUTHKEY, ca: first.cert, heartbeatIntervalMs: 0 });
    try {
      const received = new Promise<unknown>((resolve) => worker.on('message', (m) => resolve(m.payload)));
      const workerOk = await within(worker.connect(), 30_000, 'the employee to connect');
      await within(boss.connect(), 30_000, 'the boss to connect');
      const ack = await boss.send(workerOk.id, { task: 'over tls' });
      assert.deepEqual(ack.delivered, [workerOk.id]);
      assert.deepEqual(await within(received, 30_000, 'the message at the employee'), { task: 'over tls' });
    } finally {
      await Promise.all([worker.close(), boss.close()]);
    }
  });

  test('a client that does not trust the certificate is refused by its own TLS check', async () => {
    const boss = new RelayClient({ url: env.relay.url, role: 'boss', authkey: TEST_AUTHKEY, heartbeatIntervalMs: 0, minReconnectDelayMs: 60_000 });
    try {
      const failed = new Promise<Error>((resolve) => boss.on('error', (e) => e instanceof Error && resolve(e)));
      boss.connect().catch(() => undefined);
      assert.match((await within(failed, 30_000, 'the connection to fail')).message, /self-signed certificate/);
    } finally {
      await boss.close();
    }
  });

  test('curl reaches /health over https with --cacert, and fails without it', async () => {
    const ok = await runToEnd('curl', ['-sS', '--cacert', first.certFile, `${env.relay.httpUrl}/health`], childEnv());
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal((JSON.parse(ok.stdout) as { ok: boolean }).ok, true);
    const untrusted = await runToEnd('curl', ['-sS', `${env.relay.httpUrl}/health`], childEnv());
    assert.equal(untrusted.code, 60, 'curl exit 60: peer certificate cannot be authenticated');
  });

  test('`connect` and `send` work over wss:// with --ca, and with NODE_EXTRA_CA_CERTS', async () => {
    const employee = spawn(process.execPath, [CLI, 'connect', env.relay.url, '--ca', first.certFile, '--role', 'employee', '--name', 'Shell-Tls', '--tags', 'tls', '--keep-open'], { env: childEnv() });
    let stdout = '';
    employee.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    try {
      await waitUntil('the employee is authenticated', () => stdout.includes('"auth_ok"'));
      const id = (JSON.parse(stdout.split('\n').find((l) => l.includes('"auth_ok"'))!) as { id: string }).id;
      const sent = await runToEnd(process.execPath, [CLI, 'send', env.relay.url, '--ca', first.certFile, '--authkey', TEST_AUTHKEY, '--to', id, '--payload', '{"n":1}'], childEnv());
      assert.equal(sent.code, 0, sent.stderr);
      assert.deepEqual((JSON.parse(sent.stdout) as { delivered: string[] }).delivered, [id]);
      const viaEnv = await runToEnd(process.execPath, [CLI, 'send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', id, '--payload', '{"n":2}'], childEnv({ NODE_EXTRA_CA_CERTS: first.certFile }));
      assert.equal(viaEnv.code, 0, viaEnv.stderr);
      await waitUntil('both messages reached the employee', () => stdout.includes('"n":1') && stdout.includes('"n":2'));
      const untrusted = await runToEnd(process.execPath, [CLI, 'send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', id, '--payload', '{"n":3}', '--timeout', '4s'], childEnv());
      assert.equal(untrusted.code, 1);
      assert.match(untrusted.stderr, /self-signed certificate/);
    } finally {
      employee.kill('SIGTERM');
    }
  });

  test('`mimiclaw-ws health` probes https:// with --ca or --insecure, and says why it fails without', async () => {
    const withCa = await runToEnd(process.execPath, [CLI, 'health', '--url', env.relay.httpUrl, '--ca', first.certFile], childEnv());
    assert.equal(withCa.code, 0, withCa.stderr);
    assert.equal((JSON.parse(withCa.stdout) as { ok: boolean }).ok, true);
    const insecure = await runToEnd(process.execPath, [CLI, 'health', '--url', `${env.relay.httpUrl}/health`, '--insecure'], childEnv());
    assert.equal(insecure.code, 0, insecure.stderr);
    const untrusted = await runToEnd(process.execPath, [CLI, 'health', '--url', env.relay.httpUrl], childEnv());
    assert.equal(untrusted.code, 1);
    assert.match(untrusted.stderr, /--ca FILE.*--insecure/);
  });
});

describe('TLS: a renewed certificate without a restart', () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir('mimiclaw-tls-renew-');
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('reload() serves the renewed pair to new handshakes; open connections stay', async () => {
    const live = await makeCertificate(dir, 'live-a');
    const renewed = await makeCertificate(dir, 'renewed-a');
    const env = await startTestRelay({ tlsCertFile: live.certFile, tlsKeyFile: live.keyFile, tlsReloadIntervalMs: 0 });
    const boss = new RelayClient({ url: env.relay.url, role: 'boss', authkey: TEST_AUTHKEY, ca: [live.cert, renewed.cert].join('\n'), heartbeatIntervalMs: 0 });
    try {
      await within(boss.connect(), 30_000, 'the boss to connect');
      assert.equal(await presentedFingerprint(env.relay.port), live.fingerprint);
      assert.equal((await env.relay.reload()).certificate, 'unchanged');
      await renewInPlace(live, renewed);
      const result = await env.relay.reload();
      assert.equal(result.certificate, 'reloaded');
      assert.equal(await presentedFingerprint(env.relay.port), renewed.fingerprint);
      assert.equal(boss.status, 'authenticated');
      const ack = await boss.send('*', 'still here');
      assert.deepEqual(ack.failed, []);
      const health = await httpsGet(`${env.relay.httpUrl}/health`, renewed.cert);
      assert.equal(health.status, 200);
    } finally {
      await boss.close();
      await env.dispose();
    }
  });

  test('the periodic check picks up a renewal by itself', async () => {
    const live = await makeCertificate(dir, 'live-b');
    const renewed = await makeCertificate(dir, 'renewed-b');
    const env = await startTestRelay({ tlsCertFile: live.certFile, tlsKeyFile: live.keyFile, tlsReloadIntervalMs: 100 });
    try {
      assert.equal(await presentedFingerprint(env.relay.port), live.fingerprint);
      await renewInPlace(live, renewed);
      await waitUntil('the renewed certificate is presented', async () => (await presentedFingerprint(env.relay.port)) === renewed.fingerprint);
    } finally {
      await env.dispose();
    }
  });

  test('a bad renewal (garbage, a key that does not fit) is logged and the certificate in use is kept', async () => {
    const live = await makeCertificate(dir, 'live-c');
    const other = await makeCertificate(dir, 'other-c');
    const renewed = await makeCertificate(dir, 'renewed-c');
    const log = capturingLogger();
    const dataDir = await makeTempDir();
    const relay = await startRelay({ port: 0, host: '127.0.0.1', authkey: TEST_AUTHKEY, dataDir, logger: log.logger, tlsCertFile: live.certFile, tlsKeyFile: live.keyFile, tlsReloadIntervalMs: 0 });
    try {
      await fs.writeFile(live.certFile, 'not a certificate\n');
      assert.equal((await relay.reload()).certificate, 'failed');
      assert.equal(await presentedFingerprint(relay.port), live.fingerprint);
      await fs.writeFile(live.certFile, renewed.cert);
      await fs.writeFile(live.keyFile, other.key);
      assert.equal((await relay.reload()).certificate, 'failed');
      assert.equal(await presentedFingerprint(relay.port), live.fingerprint);
      await fs.rm(live.keyFile);
      assert.equal((await relay.reload()).certificate, 'failed');
      const failures = log.lines.filter((l) => l.event === 'tls_certificate_reload_failed');
      assert.equal(failures.length, 3);
      assert.equal(failures[0]!.level, 'error');
      assert.match(String(failures[0]!.error), /not a PEM certificate/);
      assert.match(String(failures[1]!.error), /does not fit the certificate/);
      assert.match(String(failures[2]!.error), /Cannot read the TLS key .*ENOENT/);
      assert.doesNotMatch(log.text(), /PRIVATE KEY/);
      // The relay still answers, and a good pair afterwards is taken.
      assert.equal((await httpsGet(`${relay.httpUrl}/health`, live.cert)).status, 200);
      await fs.writeFile(live.keyFile, renewed.key);
      assert.equal((await relay.reload()).certificate, 'reloaded');
      assert.equal(await presentedFingerprint(relay.port), renewed.fingerprint);
    } finally {
      await relay.close();
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  });

  test('SIGHUP to the running command reloads the certificate; the relay keeps running', async () => {
    const live = await makeCertificate(dir, 'live-d');
    const renewed = await makeCertificate(dir, 'renewed-d');
    const dataDir = await makeTempDir();
    const port = await freePort();
    const relay = new ChildRelay(process.execPath, [CLI, String(port), TEST_AUTHKEY, dataDir, '--host', '127.0.0.1', '--tls-cert', live.certFile, '--tls-key', live.keyFile, '--tls-reload-interval', '0'], childEnv(), port);
    try {
      await waitUntil('the relay is ready', () => relay.stdout.includes('ready: wss://'));
      assert.match(relay.stdout, new RegExp(`ready: wss://127\\.0\\.0\\.1:${port}/ws https://127\\.0\\.0\\.1:${port} `));
      assert.equal(await presentedFingerprint(port), live.fingerprint);
      await renewInPlace(live, renewed);
      relay.child.kill('SIGHUP');
      await waitUntil('the renewed certificate is presented', async () => (await presentedFingerprint(port)) === renewed.fingerprint);
      assert.match(relay.stderr, /"event":"tls_certificate_loaded"/);
      assert.equal(relay.child.exitCode, null);
      const exit = await relay.stop('SIGTERM');
      assert.equal(exit.code, 0);
    } finally {
      if (relay.child.exitCode === null) relay.child.kill('SIGKILL');
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  });
});

describe('TLS: start-up problems', () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir('mimiclaw-tls-bad-');
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  test('a key that does not fit, a missing file, or half the pair stop the start with what to fix', async () => {
    const one = await makeCertificate(dir, 'one');
    const two = await makeCertificate(dir, 'two');
    const dataDir = path.join(dir, 'data');
    const start = (...args: string[]) => runToEnd(process.execPath, [CLI, '0', TEST_AUTHKEY, dataDir, '--host', '127.0.0.1', ...args], childEnv());
    const mismatch = await start('--tls-cert', one.certFile, '--tls-key', two.keyFile);
    assert.equal(mismatch.code, 1);
    assert.match(mismatch.stderr, new RegExp(`The TLS key ${two.keyFile.replace(/[.]/g, '\\.')} does not fit the certificate`));
    const missing = await start('--tls-cert', path.join(dir, 'nope.crt'), '--tls-key', one.keyFile);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /Cannot read the TLS certificate .*nope\.crt \(ENOENT\)/);
    const half = await start('--tls-cert', one.certFile);
    assert.equal(half.code, 2);
    assert.match(half.stderr, /--tls-cert needs --tls-key <file> too/);
    await assert.rejects(startRelay({ authkey: 'k', dataDir, tlsKeyFile: one.keyFile }), /TLS needs both files/);
  });
});
