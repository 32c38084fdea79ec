// The cluster scenario: the same throughput, latency and fan-out workloads against
//   - the relay on one node (the client code of the single-node rows),
//   - the relay over two nodes on one Redis (--redis/--cluster), boss on node 1, employee on node 2,
//   - Socket.IO with its Redis adapter over two nodes, laid out the same way,
// each on a redis-server the bench starts itself. Each workload gets fresh servers (and a fresh
// Redis). A relay build without --redis is reported as not available, not as a failure.

import { randomBytes } from 'node:crypto';
import { redisUnavailable, startRedis, type RedisProcess } from './redis-server';
import type { BenchConfig, Metrics } from './scenarios';
import { startServer, type ProcessKind, type ServerProcess } from './servers';
import { cpuMs, peakRssKb, sampleRss } from './proc';
import { median } from './stats';
import { runSocketIoFanout, runSocketIoLatency, runSocketIoThroughput } from './socketio-workloads';
import { runFanout, runLatency, runThroughput, type FanoutResult, type LatencyResult, type ThroughputResult } from './workloads';

export type ClusterPeer = 'relay-1' | 'relay-2' | 'socketio-2';

export const CLUSTER_PEERS: { peer: ClusterPeer; label: string; needsRedis: boolean }[] = [
  { peer: 'relay-1', label: 'relay, 1 node', needsRedis: false },
  { peer: 'relay-2', label: 'relay cross-node, 2 nodes', needsRedis: true },
  { peer: 'socketio-2', label: 'Socket.IO + Redis adapter, 2 nodes', needsRedis: true },
];

/** The peer cannot run here at all (an old relay build, no redis-server): a note, not an error. */
export class NotAvailable extends Error {}

export interface PeerResults {
  rounds: Metrics[];
  /** Why the peer did not run, when it could not. */
  unavailable?: string;
}

export type ClusterResults = Record<ClusterPeer, PeerResults>;

interface Deployment {
  bossUrl: string;
  employeeUrl: string;
  /** Fan-out employees alternate over these. */
  fanoutUrls: string[];
  nodes: ServerProcess[];
  redis: RedisProcess | undefined;
  logTail(): string;
  stop(): Promise<void>;
}

const MB = 1024;

/** A relay that does not know --redis exits at once with a usage error naming the flag. */
const REFUSED_FLAG = /Unknown option --(redis|cluster)\b[^\n]*/;

async function startNodes(peer: ClusterPeer, config: BenchConfig, redis: RedisProcess | undefined): Promise<ServerProcess[]> {
  if (peer === 'relay-1') return [await startServer('relay', { relayArgs: config.relayArgs, nodeArgs: config.serverNodeArgs })];
  if (!redis) throw new Error(`${peer} needs a redis-server`);
  const kind: ProcessKind = peer === 'relay-2' ? 'relay' : 'socketio';
  const cluster = `bench-${randomBytes(4).toString('hex')}`;
  const relayArgs = [...config.relayArgs, '--redis', redis.url, '--cluster', cluster];
  const nodes: ServerProcess[] = [];
  try {
    for (let i = 0; i < 2; i++) {
      nodes.push(await startServer(kind, { relayArgs, redisUrl: redis.url, nodeArgs: config.serverNodeArgs }));
    }
    return nodes;
  } catch (error) {
    await Promise.all(nodes.map((n) => n.stop()));
    const message = error instanceof Error ? error.message : String(error);
    const refused = kind === 'relay' ? REFUSED_FLAG.exec(message) : null;
    if (refused) throw new NotAvailable(`not available in this build: the relay refused --redis ("${refused[0].trim()}")`);
    throw error;
  }
}

async function deploy(peer: ClusterPeer, config: BenchConfig): Promise<Deployment> {
  const redis = peer === 'relay-1' ? undefined : await startRedis();
  let nodes: ServerProcess[];
  try {
    nodes = await startNodes(peer, config, redis);
  } catch (error) {
    await redis?.stop();
    throw error;
  }
  const urlOf = (node: ServerProcess) => (node.kind === 'socketio' ? `http://127.0.0.1:${node.port}` : node.url);
  const first = nodes[0]!;
  const last = nodes[nodes.length - 1]!;
  return {
    bossUrl: urlOf(first),
    employeeUrl: urlOf(last),
    fanoutUrls: nodes.map(urlOf),
    nodes,
    redis,
    logTail: () => [...nodes.map((n, i) => `--- node ${i + 1} ---\n${n.logTail()}`), ...(redis ? [`--- redis ---\n${redis.logTail()}`] : [])].join('\n'),
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()));
      await redis?.stop();
    },
  };
}

async function withDeployment<T>(peer: ClusterPeer, config: BenchConfig, body: (d: Deployment) => Promise<T>): Promise<T> {
  const deployment = await deploy(peer, config);
  try {
    return await body(deployment);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    throw new Error(`${message}\n${deployment.logTail()}`);
  } finally {
    await deployment.stop();
  }
}

function throughputRun(peer: ClusterPeer, d: Deployment, config: BenchConfig): Promise<ThroughputResult> {
  if (peer === 'socketio-2') return runSocketIoThroughput(d.bossUrl, d.employeeUrl, config.throughputMessages, config.inFlight, config.runTimeoutMs);
  return runThroughput(d.bossUrl, config.throughputMessages, config.inFlight, config.runTimeoutMs, d.employeeUrl);
}

function latencyRun(peer: ClusterPeer, d: Deployment, config: BenchConfig): Promise<LatencyResult> {
  if (peer === 'socketio-2') return runSocketIoLatency(d.bossUrl, d.employeeUrl, config.latencyMessages, config.latencyWarmup, config.runTimeoutMs);
  return runLatency(d.bossUrl, config.latencyMessages, config.latencyWarmup, config.runTimeoutMs, d.employeeUrl);
}

function fanoutRun(peer: ClusterPeer, d: Deployment, config: BenchConfig): Promise<FanoutResult> {
  if (peer === 'socketio-2') return runSocketIoFanout(d.bossUrl, d.fanoutUrls, config.fanoutEmployees, config.fanoutBroadcasts, config.fanoutWarmup, config.runTimeoutMs);
  return runFanout(d.bossUrl, config.fanoutEmployees, config.fanoutBroadcasts, config.fanoutWarmup, config.runTimeoutMs, d.fanoutUrls);
}

/** One round of the three workloads against one peer, each on fresh servers. */
export async function runClusterRound(peer: ClusterPeer, config: BenchConfig): Promise<Metrics> {
  const throughput = await withDeployment(peer, config, async (d) => {
    const pids = d.nodes.map((n) => n.pid);
    const samplers = pids.map((pid) => sampleRss(pid));
    const cpuBefore = pids.map(cpuMs);
    const redisBefore = d.redis ? cpuMs(d.redis.pid) : 0;
    const result = await throughputRun(peer, d, config);
    const nodeCpu = pids.reduce((sum, pid, i) => sum + cpuMs(pid) - (cpuBefore[i] ?? 0), 0);
    const redisCpu = d.redis ? cpuMs(d.redis.pid) - redisBefore : Number.NaN;
    const peakKb = samplers.reduce((sum, sampler, i) => sum + Math.max(sampler.stop(), peakRssKb(pids[i]!)), 0);
    return {
      msgsPerSec: result.msgsPerSec,
      ackP50Ms: result.ackP50Ms,
      ackP99Ms: result.ackP99Ms,
      cpuUsPerMsg: (nodeCpu * 1000) / result.sent,
      redisCpuUsPerMsg: (redisCpu * 1000) / result.sent,
      clientCpuUsPerMsg: result.clientCpuUsPerMsg,
      peakRssMb: peakKb / MB,
    };
  });
  const latency = await withDeployment(peer, config, async (d) => {
    const result = await latencyRun(peer, d, config);
    return { latencyP50Ms: result.p50Ms, latencyP99Ms: result.p99Ms, latencyFreshP50Ms: result.freshP50Ms, latencyFreshP99Ms: result.freshP99Ms };
  });
  const fanout = await withDeployment(peer, config, async (d) => {
    const result = await fanoutRun(peer, d, config);
    return { fanoutDeliveriesPerSec: result.deliveriesPerSec, fanoutTimeToAllMs: result.timeToAllMs };
  });
  return { ...throughput, ...latency, ...fanout };
}

export interface ClusterRun {
  results: ClusterResults;
  errors: string[];
}

/** `rounds` rounds over the peers, the order flipping each round; progress lines go to stderr. */
export async function runClusterRounds(config: BenchConfig, peers: ClusterPeer[], summarise: (m: Metrics) => string): Promise<ClusterRun> {
  const results = Object.fromEntries(CLUSTER_PEERS.map((p) => [p.peer, { rounds: [] }])) as unknown as ClusterResults;
  const errors: string[] = [];
  const broken = new Set<ClusterPeer>();
  const noRedis = redisUnavailable();
  for (const spec of CLUSTER_PEERS) {
    if (!peers.includes(spec.peer)) results[spec.peer].unavailable = 'not selected';
    else if (spec.needsRedis && noRedis) results[spec.peer].unavailable = noRedis;
  }
  const runnable = CLUSTER_PEERS.filter((p) => results[p.peer].unavailable === undefined).map((p) => p.peer);
  for (let round = 0; round < config.rounds; round++) {
    const order = round % 2 === 0 ? runnable : [...runnable].reverse();
    for (const peer of order) {
      if (broken.has(peer) || results[peer].unavailable !== undefined) continue;
      const label = `cluster round ${round + 1}/${config.rounds} ${peer}`;
      try {
        const metrics = await runClusterRound(peer, config);
        results[peer].rounds.push(metrics);
        process.stderr.write(`${label}: ${summarise(metrics)}\n`);
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        if (error instanceof NotAvailable) {
          results[peer].unavailable = message;
          process.stderr.write(`${label}: ${message}\n`);
          continue;
        }
        errors.push(`${label}: ${message}`);
        broken.add(peer);
        process.stderr.write(`${label}: FAILED ${message}\n`);
      }
    }
  }
  return { results, errors };
}

interface ColumnRow {
  label: string;
  metric: string;
  decimals: number;
}

const CLUSTER_ROWS: ColumnRow[] = [
  { label: 'throughput, 1 boss -> 1 employee, 100 in flight (msgs/s)', metric: 'msgsPerSec', decimals: 0 },
  { label: 'throughput ack latency p50 (ms)', metric: 'ackP50Ms', decimals: 2 },
  { label: 'throughput ack latency p99 (ms)', metric: 'ackP99Ms', decimals: 2 },
  { label: 'throughput CPU per message, all nodes (us)', metric: 'cpuUsPerMsg', decimals: 1 },
  { label: 'throughput Redis CPU per message (us)', metric: 'redisCpuUsPerMsg', decimals: 1 },
  { label: 'throughput load-client CPU per message (us)', metric: 'clientCpuUsPerMsg', decimals: 1 },
  { label: 'throughput peak RSS, all nodes (MB)', metric: 'peakRssMb', decimals: 0 },
  { label: 'latency, one at a time, p50 (ms)', metric: 'latencyP50Ms', decimals: 3 },
  { label: 'latency, one at a time, p99 (ms)', metric: 'latencyP99Ms', decimals: 3 },
  { label: 'latency, first N after start, p50 (ms)', metric: 'latencyFreshP50Ms', decimals: 3 },
  { label: 'latency, first N after start, p99 (ms)', metric: 'latencyFreshP99Ms', decimals: 3 },
  { label: 'fan-out to N employees over the nodes (deliveries/s)', metric: 'fanoutDeliveriesPerSec', decimals: 0 },
  { label: 'fan-out time until all N received (ms)', metric: 'fanoutTimeToAllMs', decimals: 2 },
];

export interface ClusterTableRow {
  label: string;
  values: Record<ClusterPeer, number | null>;
  decimals: number;
}

export function buildClusterRows(results: ClusterResults): ClusterTableRow[] {
  return CLUSTER_ROWS.map((row) => {
    const values = {} as Record<ClusterPeer, number | null>;
    for (const { peer } of CLUSTER_PEERS) {
      const numbers = results[peer].rounds.map((m) => m[row.metric]).filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
      values[peer] = numbers.length ? median(numbers) : null;
    }
    return { label: row.label, values, decimals: row.decimals };
  });
}

const show = (value: number | null, decimals: number) =>
  value === null ? 'n/a' : value.toLocaleString('en-US', { minimumFractionDigits: decimals, maximumFractionDigits: decimals });

/** Measures down, peers across; the first row says whether each peer ran at all. */
export function formatClusterTable(results: ClusterResults): string {
  const rows = buildClusterRows(results);
  const status = (peer: ClusterPeer) => {
    const r = results[peer];
    if (r.unavailable === 'not selected') return 'not selected';
    if (r.unavailable !== undefined) return r.unavailable.startsWith('not available in this build') ? 'not available in this build' : 'not available here';
    return r.rounds.length ? `${r.rounds.length} round${r.rounds.length === 1 ? '' : 's'}` : 'failed';
  };
  const header = ['cluster measure', ...CLUSTER_PEERS.map((p) => p.label)];
  const cells = [
    ['ran', ...CLUSTER_PEERS.map((p) => status(p.peer))],
    ...rows.map((row) => [row.label, ...CLUSTER_PEERS.map((p) => show(row.values[p.peer], row.decimals))]),
  ];
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? '').length)));
  const line = (c: string[]) => `| ${c.map((v, i) => (i === 0 ? v.padEnd(widths[i] ?? 0) : v.padStart(widths[i] ?? 0))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i === 0 ? '-'.repeat(w + 2) : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  const notes = CLUSTER_PEERS.filter((p) => results[p.peer].unavailable !== undefined && results[p.peer].unavailable !== 'not selected').map(
    (p) => `${p.label}: ${results[p.peer].unavailable ?? ''}`,
  );
  return [line(header), rule, ...cells.map(line), ...(notes.length ? ['', ...notes] : [])].join('\n');
}
