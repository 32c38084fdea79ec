// Summarises a V8 .cpuprofile (node --cpu-prof): self time per function and per source file,
// highest first. Usage: node dist/bench/profile-summary.js FILE.cpuprofile [top=25]

import fs from 'node:fs';
import path from 'node:path';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Hotspot {
  name: string;
  selfMs: number;
  percent: number;
}

function shortUrl(url: string): string {
  if (url === '') return '';
  const clean = url.replace(/^file:\/\//, '');
  const nodeModules = clean.lastIndexOf('node_modules/');
  if (nodeModules >= 0) return clean.slice(nodeModules);
  const dist = clean.lastIndexOf('/dist/');
  if (dist >= 0) return clean.slice(dist + 1);
  return clean.startsWith('node:') ? clean : path.basename(clean);
}

function selfTimesUs(profile: CpuProfile): Map<number, number> {
  const self = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i] as number;
    // timeDeltas[i] is the time since the previous sample; attribute the next delta to this sample.
    const delta = profile.timeDeltas[i + 1] ?? 0;
    self.set(id, (self.get(id) ?? 0) + Math.max(0, delta));
  }
  return self;
}

function rank(totals: Map<string, number>, totalUs: number, top: number): Hotspot[] {
  return [...totals.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([name, us]) => ({ name, selfMs: us / 1000, percent: (100 * us) / totalUs }));
}

/** Percentages are of busy time: the (idle) samples are counted apart as idleMs. */
export function summariseProfile(file: string, top = 25): { functions: Hotspot[]; files: Hotspot[]; totalMs: number; idleMs: number } {
  const profile = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const byFunction = new Map<string, number>();
  const byFile = new Map<string, number>();
  let totalUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfTimesUs(profile)) {
    const frame = byId.get(id)?.callFrame;
    if (!frame) continue;
    if (frame.functionName === '(idle)') {
      idleUs += us;
      continue;
    }
    totalUs += us;
    const where = shortUrl(frame.url);
    const fn = `${frame.functionName || '(anonymous)'}${where ? ` ${where}:${frame.lineNumber + 1}` : ''}`;
    byFunction.set(fn, (byFunction.get(fn) ?? 0) + us);
    const fileKey = where || frame.functionName || '(native)';
    byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + us);
  }
  return { functions: rank(byFunction, totalUs, top), files: rank(byFile, totalUs, top), totalMs: totalUs / 1000, idleMs: idleUs / 1000 };
}

export function formatHotspots(title: string, hotspots: Hotspot[]): string {
  const lines = hotspots.map((h) => `${h.percent.toFixed(1).padStart(5)}%  ${h.selfMs.toFixed(0).padStart(7)} ms  ${h.name}`);
  return [`${title}`, ...lines].join('\n');
}

if (require.main === module) {
  const [file, topText] = process.argv.slice(2);
  if (file === undefined) {
    process.stderr.write('usage: node dist/bench/profile-summary.js FILE.cpuprofile [top]\n');
    process.exit(2);
  }
  const summary = summariseProfile(file, Number(topText ?? 25));
  process.stdout.write(`profile ${file}: ${summary.totalMs.toFixed(0)} ms busy, ${summary.idleMs.toFixed(0)} ms idle\n\n`);
  process.stdout.write(formatHotspots('self time by function:', summary.functions) + '\n\n');
  process.stdout.write(formatHotspots('self time by file:', summary.files) + '\n');
}
