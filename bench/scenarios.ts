// One round of each scenario against one server: start the server in its own process, run the
// workload, read the server's memory and CPU, stop it.

import { execFile, fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { makeTempDir, removeTempDir, trackChild } from './cleanup';
import { countMessagesDb, writeMessagesDb } from './message-db';
import { cpuMs, peakRssKb, rssKb, sampleRss, sleep, withTimeout } from './proc';
import { healthAnswers, startServer, type ServerKind, type ServerProcess } from './servers';
import { median } from './stats';
import { runFanout, runLatency, runTasks, runThroughput } from './workloads';
import { runAdmin } from './admin-workload';

export interface BenchConfig {
  rounds: number;
  throughputMessages: number;
  inFlight: number;
  latencyMessages: number;
  latencyWarmup: number;
  fanoutEmployees: number;
  fanoutBroadcasts: number;
  fanoutWarmup: number;
  idleConnections: number;
  idleClientProcesses: number;
  restartMessages: number;
  /** Records in the messages.db `mimiclaw-ws verify` checks. */
  verifyMessages: number;
  /** Dispatch: tasks per run, employees, and their capacity (in flight: employees x capacity). */
  dispatchTasks: number;
  dispatchEmployees: number;
  dispatchCapacity: number;
  adminEmployees: number;
  adminRequests: number;
  relayArgs: string[];
  /** Extra node flags for the server process, e.g. --cpu-prof. */
  serverNodeArgs: string[];
  /** After the throughput run, SIGUSR2 the server (started with --heapsnapshot-signal) and wait for the snapshot. */
  heapSnapshotAfterThroughput: boolean;
  runTimeoutMs: number;
}

export type Metrics = Record<string, number>;

export type ScenarioName = 'throughput' | 'latency' | 'fanout' | 'idle' | 'restart' | 'verify' | 'admin' | 'dispatch';

export interface Scenario {
  name: ScenarioName;
  /** Servers this scenario applies to. */
  kinds: ServerKind[];
  run(kind: ServerKind, config: BenchConfig): Promise<Metrics>;
}

const MB = 1024;

async function withServer<T>(kind: ServerKind, config: BenchConfig, body: (server: ServerProcess) => Promise<T>, dataDir?: string): Promise<T> {
  const server = await startServer(kind, { relayArgs: config.relayArgs, nodeArgs: config.serverNodeArgs, ...(dataDir ? { dataDir } : {}) });
  try {
    return await body(server);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    throw new Error(`${message}\n--- ${kind} log tail ---\n${server.logTail()}`);
  } finally {
    await server.stop();
  }
}

/** The server writes the snapshot on its main thread; /health answers again once it is done. */
async function takeHeapSnapshot(server: ServerProcess, timeoutMs: number): Promise<void> {
  process.kill(server.pid, 'SIGUSR2');
  await sleep(500);
  const deadline = Date.now() + timeoutMs;
  while (!(await healthAnswers(server.port))) {
    if (Date.now() > deadline) throw new Error('heap snapshot did not finish in time');
    await sleep(100);
  }
}

async function throughput(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  const dataDir = makeTempDir(`mimiclaw-bench-${kind}-`);
  try {
    let msgIdPrefix = '';
    let sent = 0;
    const metrics: Metrics = await withServer(
      kind,
      config,
      async (server) => {
        const sampler = sampleRss(server.pid);
        const cpuBefore = cpuMs(server.pid);
        const result = await runThroughput(server.url, config.throughputMessages, config.inFlight, config.runTimeoutMs);
        const cpuUsed = cpuMs(server.pid) - cpuBefore;
        const peakKb = Math.max(sampler.stop(), peakRssKb(server.pid));
        msgIdPrefix = result.msgIdPrefix;
        sent = result.sent;
        if (config.heapSnapshotAfterThroughput) await takeHeapSnapshot(server, config.runTimeoutMs);
        return {
          msgsPerSec: result.msgsPerSec,
          ackP50Ms: result.ackP50Ms,
          ackP99Ms: result.ackP99Ms,
          cpuUsPerMsg: (cpuUsed * 1000) / result.sent,
          clientCpuUsPerMsg: result.clientCpuUsPerMsg,
          peakRssMb: peakKb / MB,
        };
      },
      dataDir,
    );
    if (kind === 'relay') {
      // The server was stopped with SIGTERM above; what it logged is what survived.
      const count = await countMessagesDb(path.join(dataDir, 'messages.db'), msgIdPrefix);
      metrics.loggedPercent = (100 * count.runMessages) / sent;
      metrics.logLines = count.lines;
      metrics.logUniqueIds = count.uniqueIds;
      metrics.logUnparsable = count.unparsable;
    }
    return metrics;
  } finally {
    removeTempDir(dataDir);
  }
}

async function latency(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  return withServer(kind, config, async (server) => {
    const result = await runLatency(server.url, config.latencyMessages, config.latencyWarmup, config.runTimeoutMs);
    return { latencyP50Ms: result.p50Ms, latencyP99Ms: result.p99Ms, latencyFreshP50Ms: result.freshP50Ms, latencyFreshP99Ms: result.freshP99Ms };
  });
}

async function fanout(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  return withServer(kind, config, async (server) => {
    const result = await runFanout(server.url, config.fanoutEmployees, config.fanoutBroadcasts, config.fanoutWarmup, config.runTimeoutMs);
    return { fanoutDeliveriesPerSec: result.deliveriesPerSec, fanoutTimeToAllMs: result.timeToAllMs };
  });
}

function askIdleClient(child: ChildProcess, command: Record<string, unknown>): Promise<number> {
  return new Promise((resolve, reject) => {
    child.once('message', (reply: { ok: boolean; connected?: number; error?: string }) => {
      if (reply.ok) resolve(reply.connected ?? 0);
      else reject(new Error(`idle client: ${reply.error ?? 'failed'}`));
    });
    child.once('exit', (code) => reject(new Error(`idle client exited (${String(code)})`)));
    child.send(command);
  });
}

/** Several samples a moment apart; the median damps a GC happening at the wrong time. */
async function settledRssKb(pid: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < 5; i++) {
    await sleep(200);
    samples.push(rssKb(pid));
  }
  return median(samples);
}

async function idle(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  return withServer(kind, config, async (server) => {
    const baseKb = await settledRssKb(server.pid);
    const processes = Math.max(1, config.idleClientProcesses);
    const clients = Array.from({ length: processes }, () => {
      const child = fork(path.join(__dirname, 'idle-client.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      trackChild(child);
      return child;
    });
    try {
      const share = Math.ceil(config.idleConnections / processes);
      const counts = await withTimeout(
        Promise.all(clients.map((child, i) => askIdleClient(child, { cmd: 'connect', url: server.url, count: Math.min(share, config.idleConnections - i * share) }))),
        config.runTimeoutMs,
        'idle connections',
      );
      const connected = counts.reduce((sum, n) => sum + n, 0);
      await sleep(1000);
      const afterKb = await settledRssKb(server.pid);
      return { idleKbPerConnection: (afterKb - baseKb) / connected, idleRssMb: afterKb / MB, idleConnected: connected };
    } finally {
      for (const child of clients) {
        if (child.connected) child.send({ cmd: 'close' });
      }
      await Promise.all(clients.map((child) => (child.exitCode === null ? new Promise((r) => child.once('exit', r)) : undefined)));
    }
  });
}

const templates = new Map<number, string>();

/** A messages.db of `count` chained records, written once per run and copied from. */
async function templateDb(count: number): Promise<string> {
  let file = templates.get(count);
  if (file === undefined) {
    file = path.join(makeTempDir('mimiclaw-bench-template-'), 'messages.db');
    process.stderr.write(`  writing ${count.toLocaleString('en-US')} messages into a template messages.db ... `);
    const bytes = await writeMessagesDb(file, count);
    process.stderr.write(`${(bytes / 1024 / 1024).toFixed(0)} MB\n`);
    templates.set(count, file);
  }
  return file;
}

async function restart(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  const template = await templateDb(config.restartMessages);
  const dataDir = makeTempDir('mimiclaw-bench-restart-');
  try {
    fs.copyFileSync(template, path.join(dataDir, 'messages.db'));
    const server = await startServer(kind, { dataDir, relayArgs: config.relayArgs, nodeArgs: config.serverNodeArgs, readyTimeoutMs: config.runTimeoutMs });
    try {
      const readyRssKb = rssKb(server.pid);
      await sleep(2000);
      return { restartReadyS: server.readyMs / 1000, restartRssMb: readyRssKb / MB, restartRssAfter2sMb: rssKb(server.pid) / MB };
    } finally {
      await server.stop();
    }
  } finally {
    removeTempDir(dataDir);
  }
}

/** `mimiclaw-ws verify` on a data dir of N chained messages, timed from spawn to exit. */
async function verify(_kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  const template = await templateDb(config.verifyMessages);
  const dataDir = makeTempDir('mimiclaw-bench-verify-');
  try {
    fs.copyFileSync(template, path.join(dataDir, 'messages.db'));
    const started = performance.now();
    const stdout = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, [path.join(__dirname, '..', 'cli.js'), 'verify', '--data-dir', dataDir], { timeout: config.runTimeoutMs }, (error, out) =>
        error ? reject(new Error(`verify failed: ${error.message}`)) : resolve(out),
      );
    });
    const seconds = (performance.now() - started) / 1000;
    const checked = Number(/^intact: (\d+)/.exec(stdout)?.[1] ?? NaN);
    if (checked !== config.verifyMessages) throw new Error(`verify checked ${checked}, expected ${config.verifyMessages}: ${stdout.trim()}`);
    return { verifyS: seconds };
  } finally {
    removeTempDir(dataDir);
  }
}

/**
 * Part C: tasks with replies through any:<tag> against the same tasks sent to employee ids in
 * turn, on one relay in one run (the ceiling has no dispatch), after a warm-up of each.
 */
async function dispatch(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  return withServer(kind, config, async (server) => {
    const inFlight = config.dispatchEmployees * config.dispatchCapacity;
    const shape = [inFlight, config.dispatchEmployees, config.dispatchCapacity, config.runTimeoutMs] as const;
    // A short warm-up of each, so neither is measured while V8 still compiles its path.
    const warmup = Math.min(2000, config.dispatchTasks);
    await runTasks(server.url, 'direct', warmup, ...shape);
    await runTasks(server.url, 'any', warmup, ...shape);
    const direct = await runTasks(server.url, 'direct', config.dispatchTasks, ...shape);
    const any = await runTasks(server.url, 'any', config.dispatchTasks, ...shape);
    return { directTasksPerSec: direct.tasksPerSec, dispatchTasksPerSec: any.tasksPerSec };
  });
}

async function admin(kind: ServerKind, config: BenchConfig): Promise<Metrics> {
  return withServer(kind, config, async (server) => {
    const result = await runAdmin(server.url, config.adminEmployees, config.adminRequests, config.runTimeoutMs, () => cpuMs(server.pid));
    return {
      adminRequestP50Ms: result.requestP50Ms,
      adminRequestP99Ms: result.requestP99Ms,
      adminServerCpuMs: result.serverCpuMsPerRequest,
      adminBodyKb: result.bodyKb,
      adminPingP99Ms: result.pingP99Ms,
    };
  });
}

export const SCENARIOS: Scenario[] = [
  { name: 'throughput', kinds: ['relay', 'ceiling'], run: throughput },
  { name: 'latency', kinds: ['relay', 'ceiling'], run: latency },
  { name: 'fanout', kinds: ['relay', 'ceiling'], run: fanout },
  { name: 'idle', kinds: ['relay', 'ceiling'], run: idle },
  { name: 'restart', kinds: ['relay'], run: restart },
  { name: 'verify', kinds: ['relay'], run: verify },
  { name: 'admin', kinds: ['relay'], run: admin },
  { name: 'dispatch', kinds: ['relay'], run: dispatch },
];
