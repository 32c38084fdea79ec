// Starting the two servers under test, each in its own child process so its memory is its own
// and it does not share an event loop with the load client.

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { makeTempDir, removeTempDir, trackChild } from './cleanup';
import { freePort, nowMs, sleep } from './proc';

export type ServerKind = 'relay' | 'ceiling';
/** Also the Socket.IO peer of the cluster scenario (bench/socketio-node.ts), which needs a Redis URL. */
export type ProcessKind = ServerKind | 'socketio';

export const BENCH_AUTHKEY = 'bench-secret';

export interface ServerOptions {
  /** Data dir to use (kept); otherwise a fresh temp dir removed by stop(). */
  dataDir?: string;
  /** Extra node flags, e.g. --cpu-prof. */
  nodeArgs?: string[];
  /** Extra relay flags (ignored for the ceiling). */
  relayArgs?: string[];
  /** Redis URL for the Socket.IO peer. */
  redisUrl?: string;
  readyTimeoutMs?: number;
}

export interface ServerProcess {
  kind: ProcessKind;
  pid: number;
  port: number;
  url: string;
  dataDir: string;
  /** ms from spawn until GET /health answered 200. */
  readyMs: number;
  /** Sends SIGTERM, waits for exit (SIGKILL after timeoutMs); returns the exit code or signal. */
  stop(timeoutMs?: number): Promise<string>;
  /** The server's stderr/stdout so far (last 4 KB), for error messages. */
  logTail(): string;
}

const DIST_ROOT = path.resolve(__dirname, '..');

function commandFor(kind: ProcessKind, port: number, dataDir: string, options: ServerOptions): string[] {
  const node = options.nodeArgs ?? [];
  if (kind === 'socketio') {
    if (!options.redisUrl) throw new Error('the socket.io peer needs a redisUrl');
    return [...node, path.join(DIST_ROOT, 'bench', 'socketio-node.js'), String(port), BENCH_AUTHKEY, options.redisUrl];
  }
  if (kind === 'ceiling') {
    return [...node, path.join(DIST_ROOT, 'bench', 'bare-forwarder.js'), String(port), BENCH_AUTHKEY];
  }
  return [
    ...node,
    path.join(DIST_ROOT, 'cli.js'),
    String(port),
    BENCH_AUTHKEY,
    dataDir,
    '--host',
    '127.0.0.1',
    '--log-level',
    'warn',
    ...(options.relayArgs ?? []),
  ];
}

export function healthAnswers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/health', timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', () => resolve(false));
    req.on('timeout', () => {
      req.destroy();
      resolve(false);
    });
  });
}

function exited(child: ChildProcess): Promise<string> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve(String(child.exitCode ?? child.signalCode));
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve(String(code ?? signal))));
}

async function waitReady(child: ChildProcess, port: number, startedAt: number, timeoutMs: number, log: () => string): Promise<number> {
  while (nowMs() - startedAt < timeoutMs) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`server exited (${String(child.exitCode ?? child.signalCode)}) before it was ready:\n${log()}`);
    }
    if (await healthAnswers(port)) return nowMs() - startedAt;
    await sleep(10);
  }
  throw new Error(`server did not answer /health within ${timeoutMs} ms:\n${log()}`);
}

export async function startServer(kind: ProcessKind, options: ServerOptions = {}): Promise<ServerProcess> {
  const ownDir = options.dataDir === undefined;
  const dataDir = options.dataDir ?? makeTempDir(`mimiclaw-bench-${kind}-`);
  const port = await freePort();
  const logFile = path.join(dataDir, `${kind}.log`);
  const logFd = fs.openSync(logFile, 'a');
  const startedAt = nowMs();
  const child = spawn(process.execPath, commandFor(kind, port, dataDir, options), {
    stdio: ['ignore', logFd, logFd],
    cwd: dataDir,
  });
  fs.closeSync(logFd);
  trackChild(child);
  const logTail = () => {
    try {
      return fs.readFileSync(logFile, 'utf8').slice(-4096);
    } catch {
      return '(no log)';
    }
  };
  const stop = async (timeoutMs = 30_000) => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    const how = await exited(child);
    clearTimeout(timer);
    if (ownDir) removeTempDir(dataDir);
    return how;
  };
  try {
    const readyMs = await waitReady(child, port, startedAt, options.readyTimeoutMs ?? 60_000, logTail);
    if (child.pid === undefined) throw new Error('spawn gave no pid');
    return { kind, pid: child.pid, port, url: `ws://127.0.0.1:${port}/ws`, dataDir, readyMs, stop, logTail };
  } catch (error) {
    await stop(2000);
    throw error;
  }
}
