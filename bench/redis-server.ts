// A throwaway redis-server for the cluster scenario: a free loopback port, a temp dir, no
// snapshots and no append-only file (nothing the bench measures should wait on Redis's disk),
// stopped and removed however the run ends (it is registered with cleanup.ts).

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { makeTempDir, removeTempDir, trackChild } from './cleanup';
import { freePort, sleep } from './proc';

export interface RedisProcess {
  pid: number;
  port: number;
  url: string;
  /** SIGTERM, then SIGKILL after timeoutMs; removes the temp dir. */
  stop(timeoutMs?: number): Promise<void>;
  logTail(): string;
}

/** Why redis-server cannot be used here, or undefined when it can. */
export function redisUnavailable(command = 'redis-server'): string | undefined {
  const probe = spawnSync(command, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (probe.error) return `${command} not found (${probe.error.message}); install it (apt-get install redis-server) to run the cluster peers`;
  if (probe.status !== 0) return `${command} --version exited ${String(probe.status)}: ${probe.stderr.trim()}`;
  return undefined;
}

/** Resolves true once the server answers PING with +PONG. */
function pings(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let reply = '';
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.on('error', () => done(false));
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      reply += chunk.toString('latin1');
      if (reply.includes('\r\n')) done(reply.startsWith('+PONG'));
    });
  });
}

export async function startRedis(options: { command?: string; readyTimeoutMs?: number } = {}): Promise<RedisProcess> {
  const dir = makeTempDir('mimiclaw-bench-redis-');
  const port = await freePort();
  const logFile = path.join(dir, 'redis.log');
  const logFd = fs.openSync(logFile, 'a');
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no', '--protected-mode', 'yes', '--daemonize', 'no'];
  const child = spawn(options.command ?? 'redis-server', args, { stdio: ['ignore', logFd, logFd], cwd: dir });
  fs.closeSync(logFd);
  trackChild(child);
  let spawnError: Error | undefined;
  child.once('error', (error) => (spawnError = error));
  const logTail = () => {
    try {
      return fs.readFileSync(logFile, 'utf8').slice(-2048);
    } catch {
      return '(no log)';
    }
  };
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    }
  });
  const stop = async (timeoutMs = 10_000) => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    await exited;
    clearTimeout(timer);
    removeTempDir(dir);
  };
  const deadline = Date.now() + (options.readyTimeoutMs ?? 10_000);
  try {
    for (;;) {
      if (spawnError) throw new Error(`redis-server could not be started: ${spawnError.message}`);
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`redis-server exited (${String(child.exitCode ?? child.signalCode)}) before it answered PING:\n${logTail()}`);
      if (await pings(port)) break;
      if (Date.now() > deadline) throw new Error(`redis-server did not answer PING within ${options.readyTimeoutMs ?? 10_000} ms:\n${logTail()}`);
      await sleep(20);
    }
    if (child.pid === undefined) throw new Error('spawn gave no pid for redis-server');
    return { pid: child.pid, port, url: `redis://127.0.0.1:${port}`, stop, logTail };
  } catch (error) {
    await stop(2000);
    throw error;
  }
}
