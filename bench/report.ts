// Turning the per-round metrics into the table: one row per measure, relay vs ceiling, the
// ratio relay/ceiling, and the target from the issue it is held to.

import os from 'node:os';
import type { Metrics, ScenarioName } from './scenarios';
import type { ServerKind } from './servers';
import { median } from './stats';

export type RoundResults = Record<ScenarioName, Record<ServerKind, Metrics[]>>;

type Target =
  | { kind: 'ratioAtLeast'; value: number }
  | { kind: 'ratioAtMost'; value: number }
  | { kind: 'relayBelow'; value: number }
  | { kind: 'relayAtLeast'; value: number };

/** A row comparing two of the relay's own measures: `reference` fills the ceiling column. */

interface RowSpec {
  label: string;
  scenario: ScenarioName;
  metric: string;
  decimals: number;
  /** How rounds combine: median normally; the worst round for must-hold properties. */
  combine?: 'median' | 'min' | 'max';
  target?: Target;
  /** The relay's own metric to compare with (shown in the ceiling column), instead of the ceiling's. */
  reference?: string;
}

const ROWS: RowSpec[] = [
  { label: 'throughput, 1 boss -> 1 employee, 100 in flight (msgs/s)', scenario: 'throughput', metric: 'msgsPerSec', decimals: 0, target: { kind: 'ratioAtLeast', value: 0.85 } },
  { label: 'throughput ack latency p50 (ms)', scenario: 'throughput', metric: 'ackP50Ms', decimals: 2 },
  { label: 'throughput ack latency p99 (ms)', scenario: 'throughput', metric: 'ackP99Ms', decimals: 2, target: { kind: 'ratioAtMost', value: 1.5 } },
  { label: 'throughput server CPU per message (us)', scenario: 'throughput', metric: 'cpuUsPerMsg', decimals: 1 },
  { label: 'throughput load-client CPU per message (us)', scenario: 'throughput', metric: 'clientCpuUsPerMsg', decimals: 1 },
  { label: 'throughput server peak RSS (MB)', scenario: 'throughput', metric: 'peakRssMb', decimals: 0, combine: 'max' },
  { label: 'throughput logged/sent after SIGTERM (%)', scenario: 'throughput', metric: 'loggedPercent', decimals: 2, combine: 'min', target: { kind: 'relayAtLeast', value: 100 } },
  { label: 'latency, one at a time, p50 (ms)', scenario: 'latency', metric: 'latencyP50Ms', decimals: 3 },
  { label: 'latency, one at a time, p99 (ms)', scenario: 'latency', metric: 'latencyP99Ms', decimals: 3, target: { kind: 'ratioAtMost', value: 1.5 } },
  { label: 'latency, first N after start, p50 (ms)', scenario: 'latency', metric: 'latencyFreshP50Ms', decimals: 3 },
  { label: 'latency, first N after start, p99 (ms)', scenario: 'latency', metric: 'latencyFreshP99Ms', decimals: 3 },
  { label: 'fan-out to N employees (deliveries/s)', scenario: 'fanout', metric: 'fanoutDeliveriesPerSec', decimals: 0, target: { kind: 'ratioAtLeast', value: 0.95 } },
  { label: 'fan-out time until all N received (ms)', scenario: 'fanout', metric: 'fanoutTimeToAllMs', decimals: 2 },
  { label: 'idle memory per connection (KB)', scenario: 'idle', metric: 'idleKbPerConnection', decimals: 2, target: { kind: 'ratioAtMost', value: 1.5 } },
  { label: 'idle server RSS with N connections (MB)', scenario: 'idle', metric: 'idleRssMb', decimals: 0 },
  { label: 'restart time to ready, N logged messages (s)', scenario: 'restart', metric: 'restartReadyS', decimals: 2, combine: 'max', target: { kind: 'relayBelow', value: 5 } },
  { label: 'restart RSS at ready (MB)', scenario: 'restart', metric: 'restartRssMb', decimals: 0, combine: 'max' },
  { label: 'restart RSS 2 s after ready (MB)', scenario: 'restart', metric: 'restartRssAfter2sMb', decimals: 0, combine: 'max' },
  { label: 'audit verify, N logged messages (s)', scenario: 'verify', metric: 'verifyS', decimals: 2, combine: 'max', target: { kind: 'relayBelow', value: 10 } },
  { label: 'GET /api/admin/workforce, N employees, p50 (ms)', scenario: 'admin', metric: 'adminRequestP50Ms', decimals: 2 },
  { label: 'GET /api/admin/workforce, N employees, p99 (ms)', scenario: 'admin', metric: 'adminRequestP99Ms', decimals: 2, target: { kind: 'relayBelow', value: 20 } },
  { label: 'GET /api/admin/workforce server CPU per request (ms)', scenario: 'admin', metric: 'adminServerCpuMs', decimals: 2 },
  { label: 'GET /api/admin/workforce body (KB)', scenario: 'admin', metric: 'adminBodyKb', decimals: 0 },
  { label: 'ping round trip during those requests, p99 (ms)', scenario: 'admin', metric: 'adminPingP99Ms', decimals: 2 },
  {
    label: 'dispatch any:<tag> with replies vs direct (tasks/s)',
    scenario: 'dispatch',
    metric: 'dispatchTasksPerSec',
    reference: 'directTasksPerSec',
    decimals: 0,
    target: { kind: 'ratioAtLeast', value: 0.5 },
  },
];

export interface TableRow {
  label: string;
  relay: number | null;
  ceiling: number | null;
  ratio: number | null;
  target: string;
  met: boolean | null;
  decimals: number;
}

function combine(rounds: Metrics[] | undefined, metric: string, how: RowSpec['combine']): number | null {
  const values = (rounds ?? []).map((m) => m[metric]).filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
  if (values.length === 0) return null;
  if (how === 'min') return Math.min(...values);
  if (how === 'max') return Math.max(...values);
  return median(values);
}

function describe(target: Target | undefined): string {
  if (!target) return '';
  switch (target.kind) {
    case 'ratioAtLeast':
      return `>= ${target.value}x`;
    case 'ratioAtMost':
      return `<= ${target.value}x`;
    case 'relayBelow':
      return `< ${target.value}`;
    case 'relayAtLeast':
      return `= ${target.value}`;
  }
}

function judge(target: Target | undefined, relay: number | null, ratio: number | null): boolean | null {
  if (!target) return null;
  if (target.kind === 'ratioAtLeast') return ratio === null ? null : ratio >= target.value;
  if (target.kind === 'ratioAtMost') return ratio === null ? null : ratio <= target.value;
  if (relay === null) return null;
  return target.kind === 'relayBelow' ? relay < target.value : relay >= target.value;
}

export function buildRows(results: RoundResults): TableRow[] {
  return ROWS.filter((spec) => results[spec.scenario] !== undefined).map((spec) => {
    const relay = combine(results[spec.scenario]?.relay, spec.metric, spec.combine);
    const ceiling =
      spec.reference === undefined
        ? combine(results[spec.scenario]?.ceiling, spec.metric, spec.combine)
        : combine(results[spec.scenario]?.relay, spec.reference, spec.combine);
    const ratio = relay !== null && ceiling !== null && ceiling !== 0 ? relay / ceiling : null;
    return { label: spec.label, relay, ceiling, ratio, target: describe(spec.target), met: judge(spec.target, relay, ratio), decimals: spec.decimals };
  });
}

const show = (value: number | null, decimals: number) =>
  value === null ? 'n/a' : value.toLocaleString('en-US', { minimumFractionDigits: decimals, maximumFractionDigits: decimals });

export function formatTable(rows: TableRow[]): string {
  const header = ['measure', 'relay', 'ceiling', 'ratio', 'target', 'met'];
  const cells = rows.map((row) => [
    row.label,
    show(row.relay, row.decimals),
    show(row.ceiling, row.decimals),
    row.ratio === null ? '' : `${row.ratio.toFixed(2)}x`,
    row.target,
    row.met === null ? '' : row.met ? 'yes' : 'NO',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? '').length)));
  const line = (c: string[]) => `| ${c.map((v, i) => (i === 0 ? v.padEnd(widths[i] ?? 0) : v.padStart(widths[i] ?? 0))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i === 0 ? '-'.repeat(w + 2) : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  return [line(header), rule, ...cells.map(line)].join('\n');
}

export interface MachineInfo {
  cpu: string;
  cores: number;
  memoryGb: number;
  node: string;
  kernel: string;
  /** 1-minute load average when the run started: other work on the machine skews every row. */
  loadAverage: number;
}

export function machineInfo(): MachineInfo {
  const cpus = os.cpus();
  return {
    cpu: cpus[0]?.model ?? 'unknown',
    cores: cpus.length,
    memoryGb: Math.round(os.totalmem() / 1024 ** 3),
    node: process.version,
    kernel: `${os.type()} ${os.release()}`,
    loadAverage: Number((os.loadavg()[0] ?? 0).toFixed(2)),
  };
}
