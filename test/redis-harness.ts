// A real redis-server for the cluster tests: started on a free loopback port with a temp dir and
// no snapshots, ready once it answers PING, and always stopped by the test that started it.
// CI installs redis-server (.ci/run); locally `apt-get install -y redis-server`.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import Redis from 'ioredis';
import { freePort } from './child-relay';

export interface TestRedis {
  url: string;
  port: number;
  dir: string;
  /** A client for the test's own checks (closed by stop()). */
  client: Redis;
  /** SHUTDOWN-free stop (SIGTERM) and removal of the temp dir. */
  stop(): Promise<void>;
  /** SIGKILL, keeping the dir (for restart()). */
  kill(): Promise<void>;
  /** Starts redis-server again on the same port and dir (with appendonly yes it has its data back). */
  restart(): Promise<void>;
}

export function redisServerPath(): string | null {
  const found = spawnSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' });
  const fromPath = found.status === 0 ? found.stdout.trim() : '';
  return fromPath !== '' ? fromPath : null;
}

export async function startRedis(options: { appendonly?: boolean } = {}): Promise<TestRedis> {
  const binary = redisServerPath();
  if (binary === null) throw new Error('redis-server is not installed: apt-get install -y redis-server (CI does this in .ci/run).');
  const port = await freePort();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'mimiclaw-redis-'));
  const url = `redis://127.0.0.1:${port}`;
  let child: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();

  const launch = async () => {
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', options.appendonly ? 'yes' : 'no', '--appendfsync', 'always'];
    const proc = spawn(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    child = proc;
    exited = new Promise((resolve) => proc.once('exit', () => resolve()));
    await waitForPing(port, proc);
  };

  await launch();
  const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: (times) => Math.min(times * 50, 500) });
  client.on('error', () => undefined);
  await client.connect();

  const kill = async () => {
    child?.kill('SIGKILL');
    await exited;
  };
  return {
    url,
    port,
    dir,
    client,
    kill,
    restart: launch,
    async stop() {
      client.disconnect();
      child?.kill('SIGTERM');
      await exited;
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}

async function waitForPing(port: number, proc: ChildProcess): Promise<void> {
  const deadline = Date.now() + 10_000;
  let lastError = '';
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`redis-server exited with ${proc.exitCode} before answering PING`);
    const probe = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => undefined);
    try {
      await probe.connect();
      if ((await probe.ping()) === 'PONG') return;
    } catch (error) {
      lastError = (error as Error).message;
    } finally {
      probe.disconnect();
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  proc.kill('SIGKILL');
  throw new Error(`redis-server on port ${port} did not answer PING within 10 s (${lastError})`);
}
