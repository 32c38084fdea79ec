// node dist/bench/frame-depth.js: what the nesting check costs per frame next to JSON.parse, for
// frames of about 64 KiB of several shapes. Not a pass/fail test: it prints one line per shape.

import { MAX_FRAME_DEPTH, nestsDeeperThan } from '../lib/protocol';

const SIZE = 64 * 1024;

/** prefix + fill(n) + suffix, where n is the room left in SIZE characters. */
function pad(prefix: string, fill: (n: number) => string, suffix: string): string {
  return prefix + fill(SIZE - prefix.length - suffix.length) + suffix;
}

const SHAPES: Record<string, string> = {
  'deep, unclosed [': '['.repeat(SIZE),
  'deep, closed at the bound': JSON.stringify({ type: 'message', to: 'e', payload: nestedArrays(MAX_FRAME_DEPTH - 2, Math.floor(SIZE / (4 * MAX_FRAME_DEPTH))) }),
  'one long string': pad('{"type":"message","to":"e","payload":"', (n) => 'x'.repeat(n), '"}'),
  'escaped quotes': pad('{"type":"message","to":"e","payload":"', (n) => '\\"'.repeat(Math.floor(n / 2)), '"}'),
  'ids and short texts': JSON.stringify({ type: 'message', to: 'e', payload: Array.from({ length: SIZE / 80 }, (_, i) => ({ id: `employee-${i}`, text: `a few words, "quoted" ${i}` })) }),
  'many small objects': JSON.stringify({ type: 'message', to: 'e', payload: Array.from({ length: SIZE / 20 }, (_, i) => ({ i, n: 'ab' })) }),
};

function nestedArrays(depth: number, count: number): unknown[] {
  const one = JSON.parse('['.repeat(depth) + '1' + ']'.repeat(depth)) as unknown;
  return Array.from({ length: count }, () => one);
}

/** Median CPU µs per call of `run` over `rounds` timed batches (CPU time, so other load on the machine counts less). */
function measure(run: () => void, rounds = 15, batch = 50): number {
  for (let i = 0; i < batch; i++) run();
  const samples: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const started = process.cpuUsage();
    for (let i = 0; i < batch; i++) run();
    const used = process.cpuUsage(started);
    samples.push((used.user + used.system) / batch);
  }
  samples.sort((a, b) => a - b);
  return samples[Math.floor(samples.length / 2)]!;
}

console.log(`nesting check (bound ${MAX_FRAME_DEPTH}) vs JSON.parse, median CPU µs per frame`);
for (const [name, text] of Object.entries(SHAPES)) {
  const scan = measure(() => nestsDeeperThan(text, MAX_FRAME_DEPTH));
  const parse = measure(() => {
    try {
      JSON.parse(text);
    } catch {
      // the unclosed shape is not JSON; its parse cost is what the check saves
    }
  });
  console.log(`  ${name.padEnd(28)} ${String(text.length).padStart(7)} B  check ${scan.toFixed(1).padStart(8)}  parse ${parse.toFixed(1).padStart(8)}`);
}
