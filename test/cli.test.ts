// The mimiclaw-ws command as a user runs it: argument forms, env vars, --help/--version,
// one-line startup errors with non-zero exits, and a clean shutdown on SIGTERM/SIGINT.

import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { parseCommandLine, UsageError } from '../lib/cli-args';
import { startRelay } from '../server';
import { makeTempDir, TestSocket } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');
const SERVER = path.join(__dirname, '..', 'server.js');

interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function run(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  spawnOptions: { script?: string; uid?: number; gid?: number } = {},
): { child: ChildProcessWithoutNullStreams; done: Promise<Finished>; ready: Promise<string> } {
  const { script = CLI, ...ids } = spawnOptions;
  const child = spawn(process.execPath, [script, ...args], { env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env }, ...ids });
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
    assert.equal(inUse.code, 1);
    assert.equal(inUse.stdout, '', 'it never said it was ready');
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

test('every bad flag value is refused with a message that names the flag as typed', () => {
  const refused: [string[], RegExp][] = [
    [['-5', 'k'], /^Port must be a number from 0 to 65535, got "-5"/],
    [['--port', '-5', 'k'], /^--port must be a number from 0 to 65535, got "-5"/],
    [['1', 'k', '--rate-limit', '-5'], /^--rate-limit must be a whole number like 10; got "-5"/],
    [['1', 'k', '--fsync=maybe'], /^--fsync is a switch: give --fsync \(on\) or --fsync=false \(off\); got "--fsync=maybe"/],
    [['1', 'k', '--public-reads=yes'], /^--public-reads is a switch/],
    [['1', 'k', '--max-payload', '1GB'], /^--max-payload must be from 1KiB to 64MiB, a size like 65536, 512KiB or 1MiB; got "1GB"/],
    [['1', 'k', '--max-payload', '100'], /^--max-payload must be from 1KiB to 64MiB/],
    [['1', 'k', '--max-payload', 'lots'], /^--max-payload must be a size like 65536/],
    [['1', 'k', '--max-buffered', '10'], /^--max-buffered must be at least 1KiB/],
    [['1', 'k', '--auth-timeout', '0'], /^--auth-timeout must be from 1ms to 24d/],
    [['1', 'k', '--auth-timeout', '30d'], /^--auth-timeout must be from 1ms to 24d.*; got "30d"/],
    [['1', 'k', '--ping-interval', '60d'], /^--ping-interval must be from 0ms to 24d/],
    [['1', 'k', '--slow-peer-timeout', '0'], /^--slow-peer-timeout must be from 1ms/],
    [['1', 'k', '--maintenance-interval', '10ms'], /^--maintenance-interval must be from 1s to 24d/],
    [['1', 'k', '--max-queue-ttl', '0'], /^--max-queue-ttl must be at least 1ms/],
    [['1', 'k', '--queue-ttl', 'soon'], /^--queue-ttl must be a duration like 500ms/],
    [['1', 'k', '--dedupe-window', '-1s'], /^--dedupe-window must be a duration/],
    [['1', 'k', '--retention', '1y'], /^--retention must be a duration/],
    [['1', 'k', '--max-connections', '0'], /^--max-connections must be at least 1; got "0"/],
    [['1', 'k', '--max-unauthenticated', '1.5'], /^--max-unauthenticated must be a whole number/],
    [['1', 'k', '--max-targets', '0'], /^--max-targets must be at least 1/],
    [['1', 'k', '--max-queued', 'ten'], /^--max-queued must be a whole number/],
    [['1', 'k', '--max-auth-failures', '99999999999999999999'], /^--max-auth-failures is too large; got "99999999999999999999"/],
    [['1', 'k', '--max-messages', '-1'], /^--max-messages must be a whole number/],
    [['1', 'k', '--ws-path', 'relay'], /^--ws-path must be a path starting with "\/".*got "relay"/],
    [['1', 'k', '--log-level', 'loud'], /^--log-level must be one of/],
    [['1', 'k', '--host'], /^--host needs a value/],
    [['1', 'k', '--authkey', '--fsync'], /^--authkey needs a value/],
    [['1', 'k', '--employee-key='], /^--employee-key needs a value/],
    [['1', 'k', '--data-dir', '/a', '/b'], /^The data dir is given twice/],
    [['1', 'k', '--port', '2'], /^The port is given twice/],
    [['1', 'k', '--port', '2', '--port', '3'], /^--port is given more than once/],
    [['1', 'k', '--no-port'], /^Unknown option --no-port/],
    [['1', 'k', '-x'], /^Unknown option -x/],
    [['1', 'k', '--constructor', 'x'], /^Unknown option --constructor/],
    [['1', 'k', '--file-mode', '400'], /^--file-mode must give the owner read and write/],
    [['1', 'k', '--file-mode', 'rw'], /^--file-mode must be an octal mode such as 600 or 640; got "rw"/],
  ];
  for (const [argv, message] of refused) {
    assert.throws(() => parseCommandLine(argv, {}), (error: Error) => {
      assert.ok(error instanceof UsageError, `${argv.join(' ')}: ${error.message}`);
      assert.match(error.message, message, argv.join(' '));
      assert.doesNotMatch(error.message, /Ms\b|Bytes\b|wsPath|maxPayload|authTimeout/, `${argv.join(' ')}: names an internal option`);
      return true;
    });
  }
  const accepted = parseCommandLine(['1', 'k', '--fsync=false', '--public-reads=true', '--max-payload', '64MiB', '--auth-timeout=24d', '--', '/data'], {});
  assert.ok(accepted.kind === 'run');
  if (accepted.kind === 'run') {
    assert.equal(accepted.options.fsync, false);
    assert.equal(accepted.options.publicReads, true);
    assert.equal(accepted.options.maxPayloadBytes, 64 * 1024 * 1024);
    assert.equal(accepted.options.authTimeoutMs, 24 * 86_400_000);
    assert.equal(accepted.options.dataDir, '/data');
  }
});

test('a bad flag value on the command line exits 2 with one line naming the flag', async () => {
  const dir = await makeTempDir();
  try {
    const result = await withTimeout(run(['0', 'k', dir, '--max-payload', '1GB']).done, 10_000, 'the exit');
    assert.equal(result.code, 2);
    assert.equal(result.stderr.trim().split('\n').length, 1);
    assert.match(result.stderr, /^mimiclaw-ws: --max-payload must be/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('node dist/server.js run as a program starts the relay like the command; imported, it does not', async () => {
  const dir = await makeTempDir();
  const port = await freePort();
  const relay = run(['--port', String(port), '--authkey', 'your-secret', '--host', '127.0.0.1', '--data-dir', dir, '--log-level', 'warn'], {}, { script: SERVER });
  try {
    const line = await withTimeout(relay.ready, 10_000, 'the ready line of server.js');
    assert.match(line, new RegExp(`ws://127\\.0\\.0\\.1:${port}/ws`));
    assert.equal((await fetch(`http://127.0.0.1:${port}/health`)).status, 200);
    relay.child.kill('SIGTERM');
    assert.equal((await withTimeout(relay.done, 10_000, 'the exit')).code, 0);

    // Imported (here by a one-line program), it exports startRelay and starts nothing.
    const home = path.join(dir, 'imported-home');
    const importer = spawn(process.execPath, ['-e', `const s = require(${JSON.stringify(SERVER)}); process.stdout.write(typeof s.startRelay);`], {
      env: { PATH: process.env.PATH, HOME: process.env.HOME, MIMICLAW_RELAY_HOME: home, MIMICLAW_AUTHKEY: 'k' },
    });
    let out = '';
    importer.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const code = await withTimeout(new Promise<number | null>((resolve) => importer.on('close', resolve)), 10_000, 'the importer');
    assert.equal(code, 0);
    assert.equal(out, 'function');
    await assert.rejects(fs.access(home), 'importing server.js must not start a relay');
  } finally {
    relay.child.kill('SIGKILL');
    await fs.rm(dir, { recursive: true, force: true });
  }
});

/** The start failed, at once, with one line naming `path`, and exit 1. */
async function assertStartFailure(args: string[], expected: RegExp, spawnOptions: { uid?: number; gid?: number } = {}): Promise<void> {
  const started = run([...args, '--host', '127.0.0.1', '--log-level', 'silent'], {}, spawnOptions);
  const result = await withTimeout(started.done, 15_000, `the exit of mimiclaw-ws ${args.join(' ')}`).finally(() => started.child.kill('SIGKILL'));
  assert.equal(result.code, 1, `${args.join(' ')}: ${result.stderr}`);
  assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
  assert.match(result.stderr, expected);
  assert.doesNotMatch(result.stderr, /listen on port/);
  assert.equal(result.stdout, '', 'it never said it was ready');
}

test('a data dir that cannot be used names the path and the cause, and exits 1 at once', async () => {
  const root = await makeTempDir();
  try {
    const file = path.join(root, 'a-file');
    await fs.writeFile(file, 'not a directory');
    await assertStartFailure(['0', 'k', file], new RegExp(`Cannot use the data dir ${file}: ${file} is a file, not a directory\\. Move that file away, or pick another data dir`));
    await assertStartFailure(['0', 'k', path.join(file, 'below')], new RegExp(`${file} is a file, not a directory`));

    const dbIsDirectory = path.join(root, 'db-is-dir');
    await fs.mkdir(path.join(dbIsDirectory, 'messages.db'), { recursive: true });
    await assertStartFailure(['0', 'k', dbIsDirectory], new RegExp(`${path.join(dbIsDirectory, 'messages.db')}: it is a directory`));
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
});

test('a data dir or messages.db the relay may not write names the path and exits 1 at once', async (t) => {
  // Root may write anywhere, so as root the relay runs as nobody, which must reach this checkout.
  const asRoot = process.getuid?.() === 0;
  const nobody = asRoot ? { uid: 65534, gid: 65534 } : {};
  if (asRoot) {
    const probe = await withTimeout(run(['--version'], {}, nobody).done, 10_000, 'the probe as nobody');
    if (probe.code !== 0) {
      t.skip('running as root, and user nobody cannot read this checkout');
      return;
    }
  }
  const root = await makeTempDir();
  try {
    await fs.chmod(root, 0o755);
    const notOurs = path.join(root, 'not-ours');
    await fs.mkdir(notOurs, { mode: 0o755 });
    const readOnlyLog = path.join(root, 'read-only-log');
    await fs.mkdir(readOnlyLog, { mode: 0o755 });
    await fs.writeFile(path.join(readOnlyLog, 'messages.db'), '', { mode: 0o444 });
    if (asRoot) await fs.chown(readOnlyLog, 65534, 65534);
    else await fs.chmod(notOurs, 0o555);
    await assertStartFailure(['0', 'k', notOurs], new RegExp(`Cannot write the data dir: permission denied on ${notOurs}/[\\w.-]+\\. Give the user running the relay write access to ${notOurs}`), nobody);
    await assertStartFailure(['0', 'k', readOnlyLog], new RegExp(`permission denied on ${path.join(readOnlyLog, 'messages.db')}\\.`), nobody);
  } finally {
    await fs.chmod(root, 0o700).catch(() => undefined);
    await fs.rm(root, { recursive: true, force: true });
  }
});

test('startRelay rejects an unusable data dir with a DataDirError and leaves nothing open', async () => {
  const root = await makeTempDir();
  try {
    await fs.mkdir(path.join(root, 'queue.db'));
    await assert.rejects(startRelay({ port: 0, host: '127.0.0.1', authkey: 'k', dataDir: root, logLevel: 'silent' }), (error: Error) => {
      assert.equal(error.name, 'DataDirError');
      assert.match(error.message, new RegExp(`${path.join(root, 'queue.db')}: it is a directory`));
      return true;
    });
    // The stores that did open were closed: the same dir works once the directory is gone.
    await fs.rmdir(path.join(root, 'queue.db'));
    const relay = await startRelay({ port: 0, host: '127.0.0.1', authkey: 'k', dataDir: root, logLevel: 'silent' });
    await relay.close();
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
});
