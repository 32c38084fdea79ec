// The mimiclaw-ws command as a user runs it: argument forms, env vars, --help/--version,
// one-line startup errors with non-zero exits, and a clean shutdown on SIGTERM/SIGINT.

import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { parseCommandLine, UsageError } from '../lib/cli-args';
import { makeTempDir, TestSocket } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function run(args: string[], env: NodeJS.ProcessEnv = {}): { child: ChildProcessWithoutNullStreams; done: Promise<Finished>; ready: Promise<string> } {
  const child = spawn(process.execPath, [CLI, ...args], { env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env } });
  let stdout = '';
  let stderr = '';
  let announce: (line: string) => void = () => undefined;
  const ready = new Promise<string>((resolve) => (announce = resolve));
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    const line = stdout.split('\n').find((l) => l.includes(' ready: '));
    if (line) announce(line);
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const done = new Promise<Finished>((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
  return { child, done, ready };
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms))),
  ]);
}

test('argument forms map onto options', () => {
  const positional = parseCommandLine(['9000', 'key1', '/tmp/d'], {});
  assert.deepEqual(positional.kind === 'run' && [positional.options.port, positional.options.authkey, positional.options.dataDir], [9000, 'key1', '/tmp/d']);
  const flags = parseCommandLine(['--port', '9001', '--authkey=k2', '--host', '127.0.0.1', '--ws-path', '/relay', '--auth-timeout', '2s', '--log-level', 'warn'], {});
  assert.equal(flags.kind, 'run');
  if (flags.kind === 'run') {
    assert.equal(flags.options.port, 9001);
    assert.equal(flags.options.authkey, 'k2');
    assert.equal(flags.options.wsPath, '/relay');
    assert.equal(flags.options.authTimeoutMs, 2000);
    assert.equal(flags.options.logLevel, 'warn');
  }
  const fromEnv = parseCommandLine([], { MIMICLAW_AUTHKEY: 'envkey', MIMICLAW_RELAY_HOME: '/tmp/home' });
  assert.ok(fromEnv.kind === 'run' && fromEnv.options.authkey === 'envkey' && fromEnv.options.dataDir === '/tmp/home');
  const partB = parseCommandLine(['1', 'k', '--queue-ttl', '1h', '--max-payload', '64KiB', '--fsync', '--public-reads', '--rate-limit', '50'], {});
  assert.ok(partB.kind === 'run');
  if (partB.kind === 'run') {
    assert.equal(partB.options.queueTtlMs, 3_600_000);
    assert.equal(partB.options.maxPayloadBytes, 65536);
    assert.equal(partB.options.fsync, true);
    assert.equal(partB.options.publicReads, true);
    assert.equal(partB.options.rateLimit, 50);
  }
  for (const bad of [['70000', 'k'], ['abc', 'k'], ['1', 'k', '--bogus'], ['1', 'k', '--queue-ttl', 'soon'], ['1', 'k', '--log-level', 'loud'], [], ['1', 'k', 'd', 'extra']]) {
    assert.throws(() => parseCommandLine(bad, {}), UsageError, bad.join(' '));
  }
});

test('--help and --version', async () => {
  const help = await run(['--help']).done;
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Usage:/);
  assert.match(help.stdout, /--queue-ttl/);
  const version = await run(['--version']).done;
  assert.equal(version.code, 0);
  const pkg = JSON.parse(await fs.readFile(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
  assert.equal(version.stdout.trim(), pkg.version);
});

test('startup errors are one line with a non-zero exit', async () => {
  const dir = await makeTempDir();
  try {
    const noKey = await run(['8787'], { MIMICLAW_RELAY_HOME: dir }).done;
    assert.notEqual(noKey.code, 0);
    assert.equal(noKey.stderr.trim().split('\n').length, 1);
    assert.match(noKey.stderr, /authkey/);

    const badPort = await run(['99999', 'k', dir]).done;
    assert.notEqual(badPort.code, 0);
    assert.equal(badPort.stderr.trim().split('\n').length, 1);
    assert.match(badPort.stderr, /Port must be a number/);

    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as net.AddressInfo).port;
    const inUse = await run([String(port), 'k', dir, '--host', '127.0.0.1']).done;
    blocker.close();
    assert.notEqual(inUse.code, 0);
    assert.equal(inUse.stderr.trim().split('\n').length, 1);
    assert.match(inUse.stderr, /in use/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`positional start prints the ready line; ${signal} closes sockets with 1001 and exits 0`, async () => {
    const dir = await makeTempDir();
    const port = await freePort();
    const relay = run([String(port), 'secret', dir, '--host', '127.0.0.1', '--log-level', 'warn']);
    try {
      const line = await withTimeout(relay.ready, 10_000, 'the ready line');
      assert.match(line, new RegExp(`ws://127\\.0\\.0\\.1:${port}/ws`));
      assert.match(line, new RegExp(`http://127\\.0\\.0\\.1:${port}`));
      const health = await fetch(`http://127.0.0.1:${port}/health`);
      assert.equal(health.status, 200);
      const socket = new TestSocket(`ws://127.0.0.1:${port}/ws`);
      await socket.next('hello');
      socket.send({ type: 'auth', role: 'boss', authkey: 'secret' });
      await socket.next('auth_ok');
      relay.child.kill(signal);
      assert.equal((await socket.closed).code, 1001);
      const finished = await withTimeout(relay.done, 10_000, 'the exit');
      assert.equal(finished.code, 0);
      for (const file of ['identities.db', 'connections.db', 'messages.db']) await fs.access(path.join(dir, file));
    } finally {
      relay.child.kill('SIGKILL');
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
}

test('the data dir defaults to MIMICLAW_RELAY_HOME and the authkey to MIMICLAW_AUTHKEY', async () => {
  const dir = path.join(await makeTempDir(), 'nested', 'home');
  const port = await freePort();
  const relay = run(['--port', String(port), '--host', '127.0.0.1'], { MIMICLAW_RELAY_HOME: dir, MIMICLAW_AUTHKEY: 'from-env' });
  try {
    const line = await withTimeout(relay.ready, 10_000, 'the ready line');
    assert.ok(line.includes(dir));
    const socket = new TestSocket(`ws://127.0.0.1:${port}/ws`);
    await socket.next('hello');
    socket.send({ type: 'auth', role: 'boss', authkey: 'from-env' });
    await socket.next('auth_ok');
    await socket.close();
    relay.child.kill('SIGTERM');
    assert.equal((await relay.done).code, 0);
    await fs.access(path.join(dir, 'identities.db'));
  } finally {
    relay.child.kill('SIGKILL');
    await fs.rm(path.dirname(path.dirname(dir)), { recursive: true, force: true });
  }
});
