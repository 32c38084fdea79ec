// --profile DIR: extra, unmeasured runs that explain the numbers. A CPU profile of each server
// during the throughput workload, a heap snapshot of each right after it, and a CPU profile of
// the relay starting on the large messages.db. Each is summarised as text.

import fs from 'node:fs';
import path from 'node:path';
import { formatHeap, summariseHeap } from './heap-summary';
import { formatHotspots, summariseProfile } from './profile-summary';
import { SCENARIOS, type BenchConfig, type Metrics, type ScenarioName } from './scenarios';
import type { ServerKind } from './servers';

export function summariseMetrics(metrics: Metrics): string {
  return Object.entries(metrics)
    .map(([key, value]) => `${key}=${Number.isInteger(value) ? value : value.toFixed(3)}`)
    .join(' ');
}

/** Runs one scenario with extra node flags writing into a fresh dir; returns the new files. */
async function runWithDiagnostics(
  config: BenchConfig,
  scenario: ScenarioName,
  kind: ServerKind,
  dir: string,
  nodeArgs: string[],
  extra: Partial<BenchConfig> = {},
): Promise<{ metrics: Metrics; files: string[] }> {
  fs.mkdirSync(dir, { recursive: true });
  const before = new Set(fs.readdirSync(dir));
  const run = SCENARIOS.find((s) => s.name === scenario);
  if (!run) throw new Error(`no scenario ${scenario}`);
  const metrics = await run.run(kind, { ...config, ...extra, serverNodeArgs: [...nodeArgs, `--diagnostic-dir=${dir}`] });
  const files = fs.readdirSync(dir).filter((f) => !before.has(f)).map((f) => path.join(dir, f));
  return { metrics, files };
}

async function cpuProfile(config: BenchConfig, scenario: ScenarioName, kind: ServerKind, root: string, perUnit: number, unit: string): Promise<string> {
  const dir = path.join(root, `${scenario}-${kind}`);
  const { metrics, files } = await runWithDiagnostics(config, scenario, kind, dir, ['--cpu-prof', '--cpu-prof-interval=250']);
  const file = files.find((f) => f.endsWith('.cpuprofile'));
  const title = `=== ${kind}, ${scenario} under --cpu-prof: ${summariseMetrics(metrics)}`;
  if (!file) return `${title}\nno .cpuprofile was written (the server must exit normally on SIGTERM)`;
  const summary = summariseProfile(file, 25);
  return [
    title,
    `profile: ${file}`,
    `${summary.totalMs.toFixed(0)} ms busy (${((summary.totalMs * 1000) / perUnit).toFixed(2)} us per ${unit}), ${summary.idleMs.toFixed(0)} ms idle; percentages of busy time`,
    formatHotspots('self time by function:', summary.functions),
    formatHotspots('self time by file:', summary.files.slice(0, 15)),
  ].join('\n\n');
}

async function heapSnapshot(config: BenchConfig, kind: ServerKind, root: string): Promise<string> {
  const dir = path.join(root, `heap-${kind}`);
  const { files } = await runWithDiagnostics(config, 'throughput', kind, dir, ['--heapsnapshot-signal=SIGUSR2'], { heapSnapshotAfterThroughput: true });
  const file = files.find((f) => f.endsWith('.heapsnapshot'));
  const title = `=== ${kind}: heap right after ${config.throughputMessages.toLocaleString('en-US')} throughput messages`;
  if (!file) return `${title}\nno .heapsnapshot was written`;
  const summary = summariseHeap(file, 20);
  return [title, `snapshot: ${file}`, formatHeap(summary.groups, summary.totalBytes)].join('\n\n');
}

export async function profileAll(config: BenchConfig, kinds: ServerKind[], root: string): Promise<string> {
  const parts: string[] = [];
  for (const kind of kinds) parts.push(await cpuProfile(config, 'throughput', kind, root, config.throughputMessages, 'message'));
  for (const kind of kinds) parts.push(await heapSnapshot(config, kind, root));
  if (kinds.includes('relay')) parts.push(await cpuProfile(config, 'restart', 'relay', root, config.restartMessages, 'logged message'));
  return parts.join('\n\n');
}
