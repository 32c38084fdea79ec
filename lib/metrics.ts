// GET /metrics: Prometheus text from prom-client. Each relay owns its Registry (never the
// global one), so several relays in one process keep separate numbers. Counters follow the
// event bus; gauges and byte totals are read from a stats callback at scrape time, so nothing
// here runs per message beyond a few counter increments.

import type { IncomingMessage, ServerResponse } from 'node:http';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EventBus, RelayEvent } from './events';
import type { FailureReason } from './protocol';

/** What the relay reports at each scrape. */
export interface RelayStatsSnapshot {
  connections: { boss: number; employee: number; unauthenticated: number };
  /** Messages waiting in the store-and-forward queue. */
  queueDepth: number;
  /** Part C: dispatched tasks waiting and in progress per tag (tags with none left out). */
  dispatch?: Record<string, { waiting: number; in_progress: number }>;
  /** Documents held per store. */
  stores: { identities: number; connectionEvents: number; messages: number };
  /** WebSocket bytes received / sent since start (totals; they only grow). */
  bytesIn: number;
  bytesOut: number;
  /** Open /api/events streams, when known. */
  eventStreamClients?: number;
}

export interface RelayMetricsOptions {
  bus: EventBus;
  stats: () => RelayStatsSnapshot;
  /** Metric name prefix. Default "mimiclaw_". */
  prefix?: string;
  /**
   * Cluster: the queued copies in the cluster store. mimiclaw_queue_depth then reports it, the
   * same on every node and so without the node label (queueDepth of the stats is not read).
   */
  clusterQueueDepth?: () => Promise<number>;
}

/**
 * Label values known in advance. Each series is exported as 0 from the start: a series that
 * appears only with its first increment hides that increment from increase() and rate().
 */
const ROLES = ['boss', 'employee'] as const;
const AUTH_FAILURE_CODES = [
  'invalid_role', 'invalid_authkey', 'invalid_identity', 'identity_not_found', 'invalid_identity_key', 'role_mismatch',
  'banned', 'invalid_name', 'invalid_tags', 'invalid_health_report', 'invalid_frame', 'invalid_employee_key', 'server_full',
] as const;
const FRAME_ERROR_CODES = ['invalid_json', 'invalid_frame', 'auth_required', 'payload_too_large'] as const;
const FAILURE_REASONS: readonly FailureReason[] = ['target_not_found', 'target_banned', 'target_offline', 'target_slow'];

/** Routing is in-process work: buckets from 50 µs to 1 s. */
const ROUTE_SECONDS_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

export const METRICS_CONTENT_TYPE = Registry.PROMETHEUS_CONTENT_TYPE;

/** A counter fed from a growing total read at scrape time. */
function totalCounter(registry: Registry, name: string, help: string, read: () => number): Counter {
  let seen = 0;
  return new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const now = read();
      if (now > seen) this.inc(now - seen);
      seen = Math.max(seen, now);
    },
  });
}

/** Gauges and byte totals read from the relay's stats at scrape time. */
function registerStatsMetrics(register: Registry, p: string, current: () => RelayStatsSnapshot, clusterWide: ClusterWideMetrics | null): void {
  new Gauge({
    name: `${p}connections`,
    help: 'Open WebSocket connections by role (unauthenticated: waiting for auth).',
    labelNames: ['role'],
    registers: [register],
    collect() {
      const { boss, employee, unauthenticated } = current().connections;
      this.set({ role: 'boss' }, boss);
      this.set({ role: 'employee' }, employee);
      this.set({ role: 'unauthenticated' }, unauthenticated);
    },
  });
  if (clusterWide === null) {
    new Gauge({
      name: `${p}queue_depth`,
      help: 'Messages held in the store-and-forward queue for offline targets.',
      registers: [register],
      collect() {
        this.set(current().queueDepth);
      },
    });
  } else {
    const { registry, queueDepth } = clusterWide;
    new Gauge({
      name: `${p}queue_depth`,
      help: 'Messages held in the store-and-forward queue for offline targets (cluster: in the cluster store, the same on every node).',
      registers: [registry],
      async collect() {
        // While the cluster store cannot answer, the last value read stays.
        const depth = await queueDepth().catch(() => null);
        if (depth !== null) this.set(depth);
      },
    });
  }
  new Gauge({
    name: `${p}store_documents`,
    help: 'Documents held per store (identities.db, connections.db, messages.db).',
    labelNames: ['store'],
    registers: [register],
    collect() {
      const { identities, connectionEvents, messages } = current().stores;
      this.set({ store: 'identities' }, identities);
      this.set({ store: 'connection_events' }, connectionEvents);
      this.set({ store: 'messages' }, messages);
    },
  });
  new Gauge({
    name: `${p}event_stream_clients`,
    help: 'Open /api/events streams.',
    registers: [register],
    collect() {
      this.set(current().eventStreamClients ?? 0);
    },
  });
  new Gauge({
    name: `${p}dispatch_queue_depth`,
    help: 'Tasks sent to any:<tag> waiting for an available employee, per tag ("*" for any:*).',
    labelNames: ['tag'],
    registers: [register],
    collect() {
      this.reset();
      for (const [tag, counts] of Object.entries(current().dispatch ?? {})) this.set({ tag }, counts.waiting);
    },
  });
  new Gauge({
    name: `${p}dispatch_in_progress`,
    help: 'Tasks sent to any:<tag> held by an employee, per tag.',
    labelNames: ['tag'],
    registers: [register],
    collect() {
      this.reset();
      for (const [tag, counts] of Object.entries(current().dispatch ?? {})) this.set({ tag }, counts.in_progress);
    },
  });
  totalCounter(register, `${p}bytes_in_total`, 'WebSocket bytes received from clients.', () => current().bytesIn);
  totalCounter(register, `${p}bytes_out_total`, 'WebSocket bytes sent to clients.', () => current().bytesOut);
}

/** Cluster: values of the whole cluster, rendered after the node's own metrics without its node label. */
interface ClusterWideMetrics {
  registry: Registry;
  queueDepth: () => Promise<number>;
}

export class RelayMetrics {
  readonly registry = new Registry();
  private readonly clusterWide: ClusterWideMetrics | null;
  private readonly unsubscribe: () => void;
  private readonly stats: () => RelayStatsSnapshot;
  private snapshot: RelayStatsSnapshot | null = null;
  private readonly authSuccesses: Counter<'role' | 'reconnected'>;
  private readonly authFailures: Counter<'code'>;
  private readonly disconnects: Counter<'role'>;
  private readonly routed: Counter<'from_role'>;
  private readonly delivered: Counter;
  private readonly failed: Counter<'reason'>;
  private readonly queued: Counter;
  private readonly deliveryUpdates: Counter<'status'>;
  private readonly payloadBytes: Counter;
  private readonly routeSeconds: Histogram;
  private readonly bans: Counter<'action'>;
  private readonly healthReports: Counter<'valid'>;
  private readonly frameErrors: Counter<'code'>;
  private readonly taskOutcomes: Counter<'tag' | 'outcome'>;
  private readonly taskWaitSeconds: Histogram<'tag'>;

  constructor(options: RelayMetricsOptions) {
    const p = options.prefix ?? 'mimiclaw_';
    const register = this.registry;
    this.stats = options.stats;
    collectDefaultMetrics({ register });
    this.clusterWide = options.clusterQueueDepth ? { registry: new Registry(), queueDepth: options.clusterQueueDepth } : null;
    // One stats() call per scrape: render() takes the snapshot every gauge of that scrape reads.
    const current = () => this.snapshot ?? this.stats();

    registerStatsMetrics(register, p, current, this.clusterWide);

    this.authSuccesses = new Counter({ name: `${p}auth_successes_total`, help: 'Successful auths by role.', labelNames: ['role', 'reconnected'], registers: [register] });
    this.authFailures = new Counter({ name: `${p}auth_failures_total`, help: 'Rejected auths by error code.', labelNames: ['code'], registers: [register] });
    this.disconnects = new Counter({ name: `${p}disconnects_total`, help: 'Authenticated connections closed, by role.', labelNames: ['role'], registers: [register] });
    this.routed = new Counter({ name: `${p}messages_routed_total`, help: 'Message frames routed, by sender role.', labelNames: ['from_role'], registers: [register] });
    this.delivered = new Counter({ name: `${p}messages_delivered_total`, help: 'Per-target deliveries written at routing time.', registers: [register] });
    this.failed = new Counter({ name: `${p}messages_failed_total`, help: 'Per-target failures by reason.', labelNames: ['reason'], registers: [register] });
    this.queued = new Counter({ name: `${p}messages_queued_total`, help: 'Per-target messages queued for an offline target.', registers: [register] });
    this.deliveryUpdates = new Counter({ name: `${p}queued_outcomes_total`, help: 'Queued messages later delivered or expired.', labelNames: ['status'], registers: [register] });
    this.payloadBytes = new Counter({ name: `${p}message_bytes_total`, help: 'Bytes of routed message frames as received.', registers: [register] });
    this.routeSeconds = new Histogram({ name: `${p}routing_duration_seconds`, help: 'Time from receiving a message frame to its last write.', buckets: ROUTE_SECONDS_BUCKETS, registers: [register] });
    this.bans = new Counter({ name: `${p}bans_total`, help: 'Bans and unbans applied.', labelNames: ['action'], registers: [register] });
    this.healthReports = new Counter({ name: `${p}health_reports_total`, help: 'Employee health reports by validity.', labelNames: ['valid'], registers: [register] });
    this.frameErrors = new Counter({ name: `${p}frame_errors_total`, help: 'Client frames answered with an error, by code.', labelNames: ['code'], registers: [register] });

    this.taskOutcomes = new Counter({ name: `${p}tasks_total`, help: 'Dispatched tasks assigned, done, retried and failed, per tag.', labelNames: ['tag', 'outcome'], registers: [register] });
    this.taskWaitSeconds = new Histogram({
      name: `${p}dispatch_wait_seconds`,
      help: 'Time a task waited for an employee: from its send (or its lost lease) to its assignment, per tag.',
      labelNames: ['tag'],
      buckets: [0.001, 0.01, 0.1, 1, 10, 60, 600, 3600],
      registers: [register],
    });
    for (const role of ROLES) {
      for (const reconnected of ['false', 'true']) this.authSuccesses.inc({ role, reconnected }, 0);
      this.disconnects.inc({ role }, 0);
      this.routed.inc({ from_role: role }, 0);
    }
    for (const code of AUTH_FAILURE_CODES) this.authFailures.inc({ code }, 0);
    for (const code of FRAME_ERROR_CODES) this.frameErrors.inc({ code }, 0);
    for (const reason of FAILURE_REASONS) this.failed.inc({ reason }, 0);
    for (const status of ['delivered', 'expired']) this.deliveryUpdates.inc({ status }, 0);
    for (const action of ['ban', 'unban']) this.bans.inc({ action }, 0);
    for (const valid of ['true', 'false']) this.healthReports.inc({ valid }, 0);

    this.unsubscribe = options.bus.subscribe((event) => this.onEvent(event));
  }

  /** The exposition text. */
  render(): Promise<string> {
    this.snapshot = this.stats();
    // prom-client calls every collect() synchronously inside metrics(), before its first await.
    const text = this.registry.metrics();
    this.snapshot = null;
    if (this.clusterWide === null) return text;
    return Promise.all([text, this.clusterWide.registry.metrics()]).then(([own, cluster]) => own + cluster);
  }

  /** Serves GET /metrics. The caller has already checked read access. */
  handle(_req: IncomingMessage, res: ServerResponse): void {
    this.render().then(
      (text) => {
        res.writeHead(200, { 'content-type': METRICS_CONTENT_TYPE, 'cache-control': 'no-store', 'content-length': Buffer.byteLength(text) });
        res.end(text);
      },
      (error: Error) => {
        const body = JSON.stringify({ error: 'metrics_failed', code: 'metrics_failed', message: `Collecting metrics failed (${error.message}); try again or see the relay log.` });
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'application/json; charset=utf-8' });
        res.end(body);
      },
    );
  }

  close(): void {
    this.unsubscribe();
    this.registry.clear();
    this.clusterWide?.registry.clear();
  }

  private onEvent(event: RelayEvent): void {
    switch (event.type) {
      case 'connect':
        this.authSuccesses.inc({ role: event.node.role, reconnected: String(event.reconnected) });
        break;
      case 'auth_fail':
        this.authFailures.inc({ code: event.code });
        break;
      case 'disconnect':
        this.disconnects.inc({ role: event.node.role });
        break;
      case 'message':
        this.onMessage(event);
        break;
      case 'delivery_update':
        this.deliveryUpdates.inc({ status: event.status });
        break;
      case 'ban':
      case 'unban':
        this.bans.inc({ action: event.type });
        break;
      case 'health':
        this.healthReports.inc({ valid: String(event.valid) });
        break;
      case 'frame_error':
        this.frameErrors.inc({ code: event.code });
        break;
      case 'task_assigned':
        this.taskOutcomes.inc({ tag: event.target.slice(4), outcome: 'assigned' });
        this.taskWaitSeconds.observe({ tag: event.target.slice(4) }, event.wait_ms / 1000);
        break;
      case 'task_done':
      case 'task_retried':
      case 'task_failed':
        this.taskOutcomes.inc({ tag: event.target.slice(4), outcome: event.type.slice(5) });
        break;
    }
  }

  private onMessage(event: Extract<RelayEvent, { type: 'message' }>): void {
    this.routed.inc({ from_role: event.from.role });
    if (event.delivered.length > 0) this.delivered.inc(event.delivered.length);
    if (event.queued.length > 0) this.queued.inc(event.queued.length);
    for (const failure of event.failed) this.failed.inc({ reason: failure.reason });
    this.payloadBytes.inc(event.bytes);
    this.routeSeconds.observe(event.route_ms / 1000);
  }
}
