// GET /metrics: the output is strict Prometheus text, the counters follow real traffic, and
// two relays in one process keep separate numbers.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { EventBus } from '../lib/events';
import { RelayMetrics, type RelayStatsSnapshot } from '../lib/metrics';
import { authBoss, authEmployee, connect, http, reconnect, singleRelayOnly, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Exposition {
  types: Map<string, string>;
  help: Map<string, string>;
  samples: Sample[];
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/** Values follow Go's ParseFloat, which Prometheus uses: NaN and Inf in any letter case. */
function parseValue(text: string, line: string): number {
  if (/^\+?inf(inity)?$/i.test(text)) return Infinity;
  if (/^-inf(inity)?$/i.test(text)) return -Infinity;
  if (/^nan$/i.test(text)) return NaN;
  assert.match(text, /^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$/, `bad sample value in: ${line}`);
  return Number(text);
}

/** Parses `{a="x",b="y\"z"}` starting at `text[0] === '{'`; returns labels and the rest. */
function parseLabels(text: string, line: string): { labels: Record<string, string>; rest: string } {
  const labels: Record<string, string> = {};
  let i = 1;
  while (text[i] !== '}') {
    const eq = text.indexOf('=', i);
    assert.ok(eq > i, `label without "=" in: ${line}`);
    const name = text.slice(i, eq);
    assert.match(name, LABEL_NAME, `bad label name "${name}" in: ${line}`);
    assert.equal(text[eq + 1], '"', `label value must be quoted in: ${line}`);
    let value = '';
    let j = eq + 2;
    for (; j < text.length && text[j] !== '"'; j++) {
      if (text[j] === '\\') {
        const next = text[++j];
        assert.ok(next === '\\' || next === '"' || next === 'n', `bad escape in: ${line}`);
        value += next === 'n' ? '\n' : next;
      } else value += text[j];
    }
    assert.equal(text[j], '"', `unterminated label value in: ${line}`);
    assert.equal(name in labels, false, `repeated label ${name} in: ${line}`);
    labels[name] = value;
    i = j + 1;
    if (text[i] === ',') i++;
    else assert.equal(text[i], '}', `expected "," or "}" in: ${line}`);
  }
  return { labels, rest: text.slice(i + 1) };
}

/** The family a sample belongs to: histograms expose _bucket/_sum/_count series. */
function familyOf(name: string, types: Map<string, string>): string | undefined {
  if (types.has(name)) return name;
  const base = name.replace(/_(bucket|sum|count)$/, '');
  return types.get(base) === 'histogram' || types.get(base) === 'summary' ? base : undefined;
}

/** A strict reader for the text exposition format, version 0.0.4. */
function parseExposition(text: string): Exposition {
  assert.ok(text.endsWith('\n'), 'exposition must end with a newline');
  const out: Exposition = { types: new Map(), help: new Map(), samples: [] };
  for (const line of text.slice(0, -1).split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (meta) {
      const [, kind, name, rest] = meta as unknown as [string, 'HELP' | 'TYPE', string, string];
      assert.match(name, NAME, `bad metric name in: ${line}`);
      if (kind === 'TYPE') {
        assert.ok(TYPES.has(rest), `unknown type in: ${line}`);
        assert.equal(out.types.has(name), false, `TYPE given twice for ${name}`);
        out.types.set(name, rest);
      } else out.help.set(name, rest);
      continue;
    }
    assert.ok(!line.startsWith('#') || line.startsWith('# '), `bad comment: ${line}`);
    if (line.startsWith('#')) continue;
    const nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    assert.ok(nameMatch, `sample without a name: ${line}`);
    const name = nameMatch[0];
    let rest = line.slice(name.length);
    let labels: Record<string, string> = {};
    if (rest.startsWith('{')) ({ labels, rest } = parseLabels(rest, line));
    const parts = rest.trim().split(' ');
    assert.ok(rest.startsWith(' ') && (parts.length === 1 || parts.length === 2), `bad sample: ${line}`);
    if (parts.length === 2) assert.match(parts[1]!, /^-?\d+$/, `bad timestamp in: ${line}`);
    assert.ok(familyOf(name, out.types), `sample before its TYPE line: ${line}`);
    out.samples.push({ name, labels, value: parseValue(parts[0]!, line) });
  }
  checkHistograms(out);
  return out;
}

/** Buckets are cumulative, end with +Inf, and +Inf equals _count. */
function checkHistograms(exposition: Exposition): void {
  for (const [family, type] of exposition.types) {
    if (type !== 'histogram') continue;
    const series = new Map<string, Sample[]>();
    for (const s of exposition.samples.filter((x) => x.name === `${family}_bucket`)) {
      const { le, ...rest } = s.labels;
      assert.ok(le !== undefined, `${family}_bucket without le`);
      const key = JSON.stringify(rest);
      series.set(key, [...(series.get(key) ?? []), s]);
    }
    for (const [key, buckets] of series) {
      const bounds = buckets.map((b) => parseValue(b.labels.le!, family));
      for (let i = 1; i < buckets.length; i++) {
        assert.ok(bounds[i]! > bounds[i - 1]!, `${family} buckets out of order`);
        assert.ok(buckets[i]!.value >= buckets[i - 1]!.value, `${family} buckets not cumulative`);
      }
      assert.equal(bounds.at(-1), Infinity, `${family} lacks a +Inf bucket`);
      const count = exposition.samples.find((s) => s.name === `${family}_count` && JSON.stringify(s.labels) === key);
      assert.equal(count?.value, buckets.at(-1)!.value, `${family}_count differs from its +Inf bucket`);
    }
  }
}

function value(exposition: Exposition, name: string, labels: Record<string, string> = {}): number {
  const found = exposition.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  return found.reduce((sum, s) => sum + s.value, 0);
}

async function scrape(relay: TestRelay, route = '/metrics'): Promise<Exposition> {
  const response = await fetch(relay.relay.httpUrl + route);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parseExposition(await response.text());
}

describe('metrics', () => {
  let relay: TestRelay;
  before(async () => {
    relay = await startTestRelay();
  });
  after(async () => {
    await relay.dispose();
  });

  test('the parser rejects malformed exposition text', () => {
    assert.throws(() => parseExposition('x 1\n'), /before its TYPE/);
    assert.throws(() => parseExposition('# TYPE x counter\nx{a="1} 1\n'), /unterminated|expected/);
    assert.throws(() => parseExposition('# TYPE x counter\nx one\n'), /bad sample value/);
    assert.throws(() => parseExposition('# TYPE x gauge\nx 1'), /newline/);
  });

  test('output parses as Prometheus text, with the relay families and default process metrics', async () => {
    const exposition = await scrape(relay);
    for (const [name, type] of [
      ['mimiclaw_connections', 'gauge'],
      ['mimiclaw_auth_successes_total', 'counter'],
      ['mimiclaw_auth_failures_total', 'counter'],
      ['mimiclaw_messages_routed_total', 'counter'],
      ['mimiclaw_messages_delivered_total', 'counter'],
      ['mimiclaw_messages_failed_total', 'counter'],
      ['mimiclaw_messages_queued_total', 'counter'],
      ['mimiclaw_bytes_in_total', 'counter'],
      ['mimiclaw_bytes_out_total', 'counter'],
      ['mimiclaw_routing_duration_seconds', 'histogram'],
      ['mimiclaw_queue_depth', 'gauge'],
      ['mimiclaw_store_documents', 'gauge'],
      ['nodejs_eventloop_lag_seconds', 'gauge'],
      ['process_resident_memory_bytes', 'gauge'],
    ]) {
      assert.equal(exposition.types.get(name!), type, `${name} should be a ${type}`);
      assert.ok(exposition.help.get(name!), `${name} needs HELP`);
    }
    // /api/metrics is the same endpoint.
    assert.ok((await scrape(relay, '/api/metrics')).types.has('mimiclaw_connections'));
  });

  test('labelled counters start at 0 for every known label value, so the first increment is seen', singleRelayOnly('/metrics is per node (its samples carry a node label): a scrape through the balancer reads whichever node it reaches'), async () => {
    const fresh = await startTestRelay();
    try {
      const exposition = await scrape(fresh);
      const sample = (name: string, labels: Record<string, string>) =>
        exposition.samples.find((s) => s.name === name && Object.keys(labels).length === Object.keys(s.labels).length && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
      for (const [name, labels] of [
        ['mimiclaw_auth_successes_total', { role: 'boss', reconnected: 'false' }],
        ['mimiclaw_auth_successes_total', { role: 'employee', reconnected: 'true' }],
        ['mimiclaw_auth_failures_total', { code: 'invalid_authkey' }],
        ['mimiclaw_auth_failures_total', { code: 'banned' }],
        ['mimiclaw_disconnects_total', { role: 'employee' }],
        ['mimiclaw_messages_routed_total', { from_role: 'boss' }],
        ['mimiclaw_messages_failed_total', { reason: 'target_offline' }],
        ['mimiclaw_messages_failed_total', { reason: 'target_slow' }],
        ['mimiclaw_queued_outcomes_total', { status: 'expired' }],
        ['mimiclaw_bans_total', { action: 'unban' }],
        ['mimiclaw_health_reports_total', { valid: 'false' }],
        ['mimiclaw_frame_errors_total', { code: 'invalid_json' }],
      ] as const) {
        assert.equal(sample(name, labels)?.value, 0, `${name}${JSON.stringify(labels)} should be exported as 0 before its first increment`);
      }
    } finally {
      await fresh.dispose();
    }
  });

  test('counters and gauges move with traffic', singleRelayOnly('/metrics is per node (its samples carry a node label): a scrape through the balancer reads whichever node it reaches'), async () => {
    const start = await scrape(relay);
    const boss = await authBoss(relay.relay);
    const worker = await authEmployee(relay.relay, 'Metric-Worker', ['metrics']);
    const away = await authEmployee(relay.relay, 'Metric-Away', ['metrics']);
    await away.socket.close();
    const rejected = await connect(relay.relay);
    rejected.send({ type: 'auth', role: 'boss', authkey: 'wrong' });
    await rejected.next('error');
    await rejected.closed;

    boss.socket.send({ type: 'message', to: worker.id, payload: 'hello' });
    await boss.socket.next('delivery_ack');
    boss.socket.send({ type: 'message', to: ['employee-00000000-0000-4000-8000-000000000000', away.id], payload: 'x' });
    await boss.socket.next('delivery_ack');
    boss.socket.send({ type: 'message', to: away.id, payload: 'later', queue: true });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [away.id]);

    const middle = await scrape(relay);
    const delta = (name: string, labels: Record<string, string> = {}) => value(middle, name, labels) - value(start, name, labels);
    assert.equal(middle.samples.find((s) => s.name === 'mimiclaw_connections' && s.labels.role === 'employee')?.value, 1);
    assert.equal(value(middle, 'mimiclaw_connections', { role: 'boss' }), 1);
    assert.equal(delta('mimiclaw_auth_successes_total', { role: 'employee' }), 2);
    assert.equal(delta('mimiclaw_auth_successes_total', { role: 'boss' }), 1);
    assert.equal(delta('mimiclaw_auth_failures_total', { code: 'invalid_authkey' }), 1);
    assert.equal(delta('mimiclaw_messages_routed_total', { from_role: 'boss' }), 3);
    assert.equal(delta('mimiclaw_messages_delivered_total'), 1);
    assert.equal(delta('mimiclaw_messages_failed_total', { reason: 'target_not_found' }), 1);
    assert.equal(delta('mimiclaw_messages_failed_total', { reason: 'target_offline' }), 1);
    assert.equal(delta('mimiclaw_messages_queued_total'), 1);
    assert.equal(delta('mimiclaw_routing_duration_seconds_count'), 3);
    assert.equal(value(middle, 'mimiclaw_queue_depth'), 1);
    assert.ok(value(middle, 'mimiclaw_store_documents', { store: 'identities' }) >= 3);
    assert.ok(delta('mimiclaw_bytes_in_total') > 0);
    assert.ok(delta('mimiclaw_bytes_out_total') > 0);
    assert.ok(delta('mimiclaw_message_bytes_total') > 0);

    // The queued message is delivered on reconnect: depth drops, the outcome is counted.
    const back = await reconnect(relay.relay, away, 'employee');
    await back.socket.next('message');
    await boss.socket.next('delivery_update');
    const end = await scrape(relay);
    assert.equal(value(end, 'mimiclaw_queue_depth'), 0);
    assert.equal(value(end, 'mimiclaw_queued_outcomes_total', { status: 'delivered' }) - value(start, 'mimiclaw_queued_outcomes_total', { status: 'delivered' }), 1);
    assert.equal(value(end, 'mimiclaw_auth_successes_total', { role: 'employee', reconnected: 'true' }) - value(start, 'mimiclaw_auth_successes_total', { role: 'employee', reconnected: 'true' }), 1);
    await Promise.all([boss.socket.close(), worker.socket.close(), back.socket.close()]);
  });

  test('two relays in one process keep separate registries', singleRelayOnly('compares the registries of two relay processes; a cluster node scrape reads one node'), async () => {
    const other = await startTestRelay();
    try {
      const otherBoss = await authBoss(other.relay);
      const mine = await scrape(relay);
      const theirs = await scrape(other);
      assert.equal(value(theirs, 'mimiclaw_auth_successes_total'), 1);
      assert.ok(value(mine, 'mimiclaw_auth_successes_total') > 1);
      await otherBoss.socket.close();
    } finally {
      await other.dispose();
    }
  });

  test('a scrape reads the stats callback once, and totals never go down', async () => {
    let calls = 0;
    let bytesIn = 100;
    const stats = (): RelayStatsSnapshot => {
      calls++;
      return { connections: { boss: 0, employee: 0, unauthenticated: 2 }, queueDepth: 3, stores: { identities: 4, connectionEvents: 5, messages: 6 }, bytesIn, bytesOut: 7 };
    };
    const metrics = new RelayMetrics({ bus: new EventBus(), stats });
    try {
      const first = parseExposition(await metrics.render());
      assert.equal(calls, 1);
      assert.equal(value(first, 'mimiclaw_connections', { role: 'unauthenticated' }), 2);
      assert.equal(value(first, 'mimiclaw_store_documents', { store: 'messages' }), 6);
      assert.equal(value(first, 'mimiclaw_bytes_in_total'), 100);
      bytesIn = 150;
      assert.equal(value(parseExposition(await metrics.render()), 'mimiclaw_bytes_in_total'), 150);
      assert.equal(calls, 2);
    } finally {
      metrics.close();
    }
  });

  test('reads from loopback need no key; the key is accepted too', async () => {
    const withKey = await http(relay.relay, 'GET', '/metrics', { authkey: TEST_AUTHKEY });
    assert.equal(withKey.status, 200);
    assert.match(String(withKey.body.raw), /mimiclaw_connections/);
  });
});
