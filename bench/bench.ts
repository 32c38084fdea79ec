// npm run bench: the relay against a bare ws forwarder (the ceiling), same client, alternating,
// medians of several rounds. Not a pass/fail test: it prints a table and optionally writes JSON.
//
//   node dist/bench/bench.js [--quick] [--rounds N] [--json FILE] [--only relay|ceiling|cluster]
//     [--scenarios throughput,latency,fanout,idle,restart,verify,admin,cluster,dispatch] [--relay-args "--flag value"]
//     [--profile DIR] [--max-minutes M]
//
// The cluster scenario (bench/cluster.ts) has its own table: the relay on one node, the relay over
// two nodes on Redis, and Socket.IO with its Redis adapter over two nodes.

import fs from 'node:fs';
import path from 'node:path';
import minimist from 'minimist';
import { cleanupNow, installCleanupHandlers } from './cleanup';
import { CLUSTER_PEERS, formatClusterTable, runClusterRounds, type ClusterPeer, type ClusterRun } from './cluster';
import { profileAll, summariseMetrics } from './profiling';
import { buildRows, formatTable, machineInfo, type RoundResults } from './report';
import { SCENARIOS, type BenchConfig, type ScenarioName } from './scenarios';
import type { ServerKind } from './servers';

const FULL: Omit<BenchConfig, 'relayArgs' | 'serverNodeArgs' | 'heapSnapshotAfterThroughput'> = {
  rounds: 3,
  throughputMessages: 50_000,
  inFlight: 100,
  latencyMessages: 5000,
  latencyWarmup: 500,
  fanoutEmployees: 1000,
  fanoutBroadcasts: 50,
  fanoutWarmup: 5,
  idleConnections: 10_000,
  idleClientProcesses: 2,
  restartMessages: 1_000_000,
  verifyMessages: 1_000_000,
  adminEmployees: 1000,
  adminRequests: 100,
  dispatchTasks: 20_000,
  dispatchEmployees: 20,
  dispatchCapacity: 5,
  runTimeoutMs: 120_000,
};

const QUICK: typeof FULL = {
  ...FULL,
  rounds: 1,
  throughputMessages: 5000,
  latencyMessages: 500,
  latencyWarmup: 100,
  fanoutEmployees: 200,
  fanoutBroadcasts: 5,
  fanoutWarmup: 1,
  idleConnections: 1000,
  restartMessages: 100_000,
  verifyMessages: 100_000,
  dispatchTasks: 3000,
  runTimeoutMs: 60_000,
};

interface Cli {
  config: BenchConfig;
  quick: boolean;
  json: string | undefined;
  kinds: ServerKind[];
  scenarios: ScenarioName[];
  /** Run the cluster scenario, and with which peers. */
  clusterPeers: ClusterPeer[];
  profileDir: string | undefined;
  maxMinutes: number;
}

function parseCli(argv: string[]): Cli {
  const args = minimist(argv, { boolean: ['quick'], string: ['json', 'only', 'scenarios', 'relay-args', 'profile', 'rounds', 'max-minutes'] });
  const quick = args.quick === true;
  const base = quick ? QUICK : FULL;
  const rounds = args.rounds !== undefined ? Number(args.rounds) : base.rounds;
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds must be a whole number >= 1');
  const only = args.only === undefined ? undefined : String(args.only);
  if (only !== undefined && !['relay', 'ceiling', 'cluster'].includes(only)) throw new Error(`--only must be relay, ceiling or cluster, got "${only}"`);
  const kinds: ServerKind[] = only === 'relay' ? ['relay'] : only === 'ceiling' ? ['ceiling'] : ['relay', 'ceiling'];
  const known: string[] = [...SCENARIOS.map((s) => s.name), 'cluster'];
  const asked = args.scenarios ? String(args.scenarios).split(',').filter(Boolean) : only === 'cluster' ? ['cluster'] : known;
  for (const name of asked) if (!known.includes(name)) throw new Error(`unknown scenario "${name}"; known: ${known.join(', ')}`);
  const scenarios = asked.filter((name): name is ScenarioName => name !== 'cluster');
  // The ceiling has no cluster form; --only relay keeps the relay's two columns.
  const clusterPeers: ClusterPeer[] = !asked.includes('cluster') || only === 'ceiling' ? [] : only === 'relay' ? ['relay-1', 'relay-2'] : CLUSTER_PEERS.map((p) => p.peer);
  const relayArgs = args['relay-args'] ? String(args['relay-args']).split(/\s+/).filter(Boolean) : [];
  return {
    config: { ...base, rounds, relayArgs, serverNodeArgs: [], heapSnapshotAfterThroughput: false },
    quick,
    json: args.json ? String(args.json) : undefined,
    kinds,
    scenarios,
    clusterPeers,
    profileDir: args.profile ? path.resolve(String(args.profile)) : undefined,
    maxMinutes: args['max-minutes'] !== undefined ? Number(args['max-minutes']) : quick ? 5 : 20,
  };
}

async function runRounds(cli: Cli): Promise<{ results: RoundResults; errors: string[] }> {
  const results = {} as RoundResults;
  const errors: string[] = [];
  const broken = new Set<string>();
  for (const scenario of SCENARIOS.filter((s) => cli.scenarios.includes(s.name))) {
    results[scenario.name] = { relay: [], ceiling: [] };
    const kinds = scenario.kinds.filter((k) => cli.kinds.includes(k));
    for (let round = 0; round < cli.config.rounds; round++) {
      // Alternate who goes first so drift (thermal, page cache) does not favour one side.
      const order = round % 2 === 0 ? kinds : [...kinds].reverse();
      for (const kind of order) {
        if (broken.has(`${scenario.name}:${kind}`) || broken.has(kind)) continue;
        const label = `${scenario.name} round ${round + 1}/${cli.config.rounds} ${kind}`;
        try {
          const metrics = await scenario.run(kind, cli.config);
          results[scenario.name][kind].push(metrics);
          process.stderr.write(`${label}: ${summariseMetrics(metrics)}\n`);
        } catch (error) {
          const message = error instanceof Error ? error.message : String(error);
          errors.push(`${label}: ${message}`);
          broken.add(`${scenario.name}:${kind}`);
          // A server that cannot start will not start for the next scenario either.
          if (/before it was ready|did not answer \/health/.test(message)) broken.add(kind);
          process.stderr.write(`${label}: FAILED ${message}\n`);
        }
      }
    }
  }
  return { results, errors };
}

function describeConfig(config: BenchConfig): string {
  return [
    `rounds ${config.rounds} (median; logged/sent: worst round; peak RSS / restart: max)`,
    `throughput ${config.throughputMessages.toLocaleString('en-US')} msgs, ${config.inFlight} in flight`,
    `latency ${config.latencyMessages} msgs after ${config.latencyWarmup} + ${config.latencyMessages} warm-up (first N after start: the ${config.latencyMessages} after ${config.latencyWarmup})`,
    `fan-out N=${config.fanoutEmployees} employees x ${config.fanoutBroadcasts} broadcasts`,
    `idle N=${config.idleConnections.toLocaleString('en-US')} employees`,
    `restart N=${config.restartMessages.toLocaleString('en-US')} messages`,
    `verify N=${config.verifyMessages.toLocaleString('en-US')} messages`,
    `admin N=${config.adminEmployees.toLocaleString('en-US')} employees x ${config.adminRequests} requests`,
    `cluster: the throughput, latency and fan-out counts above, fan-out employees alternating over the nodes`,
    `dispatch ${config.dispatchTasks.toLocaleString('en-US')} tasks with replies, ${config.dispatchEmployees} employees x capacity ${config.dispatchCapacity}`,
  ].join('; ');
}

async function main(): Promise<void> {
  const cli = parseCli(process.argv.slice(2));
  installCleanupHandlers();
  const watchdog = setTimeout(() => {
    process.stderr.write(`bench: exceeded --max-minutes ${cli.maxMinutes}; stopping\n`);
    cleanupNow();
    process.exit(1);
  }, cli.maxMinutes * 60_000);
  watchdog.unref();
  if (cli.kinds.includes('relay') && !fs.existsSync(path.join(__dirname, '..', 'cli.js'))) {
    process.stderr.write('bench: dist/cli.js is missing; measuring the ceiling only\n');
    cli.kinds = cli.kinds.filter((k) => k !== 'relay');
  }
  const startedAt = Date.now();
  const machine = machineInfo();
  process.stderr.write(`bench: ${describeConfig(cli.config)}\n`);
  const { results, errors } = await runRounds(cli);
  let cluster: ClusterRun | undefined;
  if (cli.clusterPeers.length > 0) {
    if (!fs.existsSync(path.join(__dirname, '..', 'cli.js'))) cli.clusterPeers = cli.clusterPeers.filter((p) => p === 'socketio-2');
    cluster = await runClusterRounds(cli.config, cli.clusterPeers, summariseMetrics);
    errors.push(...cluster.errors);
  }
  const rows = buildRows(results);
  const out = [
    `machine: ${machine.cpu}, ${machine.cores} cores, ${machine.memoryGb} GB, node ${machine.node}, ${machine.kernel}; load average ${machine.loadAverage} at start`,
    `config: ${describeConfig(cli.config)}`,
    '',
    ...(cli.scenarios.length ? [formatTable(rows), ''] : []),
    ...(cluster ? [formatClusterTable(cluster.results), ''] : []),
    ...(errors.length ? ['errors:', ...errors.map((e) => e.split('\n').slice(0, 8).map((l) => `  ${l}`).join('\n')), ''] : []),
    `took ${((Date.now() - startedAt) / 1000).toFixed(0)} s`,
  ];
  process.stdout.write(out.join('\n') + '\n');
  const profile = cli.profileDir ? await profileAll(cli.config, cli.kinds, cli.profileDir) : undefined;
  if (profile) process.stdout.write(`\n${profile}\n`);
  if (cli.json) {
    const report = { machine, config: cli.config, startedAt: new Date(startedAt).toISOString(), rows, rounds: results, cluster: cluster?.results, errors, profile };
    fs.writeFileSync(cli.json, JSON.stringify(report, null, 2) + '\n');
    process.stderr.write(`bench: wrote ${cli.json}\n`);
  }
}

main()
  .then(() => {
    cleanupNow();
    process.exit(0);
  })
  .catch((error: unknown) => {
    process.stderr.write(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    cleanupNow();
    process.exit(1);
  });
