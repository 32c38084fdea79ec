// Summarises a V8 .heapsnapshot: self size and count per constructor (strings, code and
// arrays lumped by kind), largest first. Usage: node dist/bench/heap-summary.js FILE [top=25]

import fs from 'node:fs';

interface HeapSnapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[], ...unknown[]] } };
  nodes: number[];
  strings: string[];
}

export interface HeapGroup {
  name: string;
  count: number;
  selfBytes: number;
}

/** Names that are contents, not kinds, are grouped by their kind. */
const LUMPED_TYPES = new Set(['string', 'concatenated string', 'sliced string', 'number', 'code', 'hidden', 'synthetic']);

export function summariseHeap(file: string, top = 25): { groups: HeapGroup[]; totalBytes: number } {
  const heap = JSON.parse(fs.readFileSync(file, 'utf8')) as HeapSnapshot;
  const fields = heap.snapshot.meta.node_fields;
  const typeNames = heap.snapshot.meta.node_types[0];
  const width = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const groups = new Map<string, HeapGroup>();
  let totalBytes = 0;
  for (let i = 0; i < heap.nodes.length; i += width) {
    const type = typeNames[heap.nodes[i + typeAt] as number] ?? '?';
    const size = heap.nodes[i + sizeAt] as number;
    const name = LUMPED_TYPES.has(type) ? `(${type})` : `${heap.strings[heap.nodes[i + nameAt] as number] ?? '?'} [${type}]`;
    const group = groups.get(name) ?? { name, count: 0, selfBytes: 0 };
    group.count++;
    group.selfBytes += size;
    groups.set(name, group);
    totalBytes += size;
  }
  return { groups: [...groups.values()].sort((a, b) => b.selfBytes - a.selfBytes).slice(0, top), totalBytes };
}

export function formatHeap(groups: HeapGroup[], totalBytes: number): string {
  const lines = groups.map(
    (g) => `${((100 * g.selfBytes) / totalBytes).toFixed(1).padStart(5)}%  ${(g.selfBytes / 1024 / 1024).toFixed(1).padStart(7)} MB  ${String(g.count).padStart(8)}x  ${g.name}`,
  );
  return [`heap self size by constructor (total ${(totalBytes / 1024 / 1024).toFixed(1)} MB):`, ...lines].join('\n');
}

if (require.main === module) {
  const [file, topText] = process.argv.slice(2);
  if (file === undefined) {
    process.stderr.write('usage: node dist/bench/heap-summary.js FILE.heapsnapshot [top]\n');
    process.exit(2);
  }
  const summary = summariseHeap(file, Number(topText ?? 25));
  process.stdout.write(formatHeap(summary.groups, summary.totalBytes) + '\n');
}
