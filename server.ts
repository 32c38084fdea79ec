// The relay's public entry: startRelay(options) runs one relay and returns its handle. Each call
// builds its own stores, router and servers: there is no module-level state, so one process can
// run several relays.

import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { BossKeys, type BossKeysReloadResult } from './lib/boss-keys';
import { ClusterEventReaders } from './lib/cluster-event-readers';
import type { ClusterLink } from './lib/cluster-link';
import { communicationsPage, readPage, readQuery, type CommunicationsPage } from './lib/communications';
import { ConnectionLog } from './lib/connection-log';
import { lockDataDir, type DataDirLock } from './lib/data-dir-lock';
import { prepareDataDir } from './lib/data-dir';
import { DedupeCache } from './lib/dedupe-cache';
import { DeliveryQueue } from './lib/delivery-queue';
import { Dispatcher } from './lib/dispatch';
import { ClusterDispatch } from './lib/redis-dispatch';
import type { TaskDispatch } from './lib/task-dispatch';
import { serveDashboard } from './lib/dashboard-page';
import { logRelayEvents } from './lib/event-log';
import { EventStream } from './lib/event-stream';
import { EventBus, type RelayEvent } from './lib/events';
import { HttpApi, type HttpExtensions, type OtherNodes } from './lib/http-api';
import { IdentityStore } from './lib/identity-store';
import { createLogger, type Logger } from './lib/logger';
import { MessageLog } from './lib/message-log';
import { RelayMetrics } from './lib/metrics';
import { loadNodeId } from './lib/node-id';
import { resolveOptions, type RelayOptions, type ResolvedOptions } from './lib/options';
import { RedisCluster, SEEN_SHARE_MS } from './lib/redis-cluster';
import { Router } from './lib/router';
import { loadKeyFiles, reloadKeyFiles, type KeyReloadResult } from './lib/secret-files';
import { SingleNode } from './lib/single-node';
import { assertNotDirectory, dataDirError } from './lib/start-errors';
import { NedbTaskStore } from './lib/task-store';
import { CertificateReloader, type CertificateReloadResult } from './lib/tls';
import { packageVersion } from './lib/version';
import { heartbeatStaleMs } from './lib/workforce';
import { WsGateway } from './lib/ws-gateway';

export type { RelayOptions } from './lib/options';
export { DataDirError } from './lib/start-errors';
export type { RelayEvent } from './lib/events';
export * from './lib/protocol';

export interface RelayHandle {
  /** ws://HOST:PORT/ws, or wss:// with TLS (loopback address when listening on all interfaces). */
  url: string;
  /** http://HOST:PORT, or https:// with TLS */
  httpUrl: string;
  port: number;
  dataDir: string;
  /** This node's stable id (docs/CLUSTER.md). */
  nodeId: string;
  /** The cluster this node joined, or null without --redis. */
  clusterName: string | null;
  events: EventBus;
  /**
   * What SIGHUP does: reads the key files, the TLS files and the boss keys file again. New keys
   * apply to auths from then on (sessions of a boss whose named key was removed or changed are
   * closed, 4009); a renewed certificate to handshakes from then on. A file that fails keeps what is in use.
   */
  reload(): Promise<ReloadResult>;
  /** Closes every socket with 1001, finishes pending writes, closes the stores. */
  close(): Promise<void>;
}

export interface ReloadResult {
  keys: KeyReloadResult;
  /** 'off' without TLS. */
  certificate: CertificateReloadResult | 'off';
  /** 'off' without --boss-keys-file. */
  bossKeys: BossKeysReloadResult | 'off';
}

/** The most recent msg_ids remembered for dedupe, whatever the window. */
const DEDUPE_MAX_ENTRIES = 200_000;
const CLOSE_HANDSHAKE_GRACE_MS = 2000;

interface Stores {
  identities: IdentityStore;
  connectionLog: ConnectionLog;
  messageLog: MessageLog;
  queue: DeliveryQueue;
  tasks: NedbTaskStore;
}

/** The other nodes, or nothing elsewhere on a single node; the only place that knows which. */
async function openClusterLink(options: ResolvedOptions, nodeId: string, logger: Logger): Promise<{ link: ClusterLink; identities: IdentityStore | null }> {
  if (options.redisUrl === undefined) return { link: new SingleNode(nodeId), identities: null };
  const cluster = await RedisCluster.connect({
    url: options.redisUrl,
    clusterName: options.clusterName,
    nodeId,
    dedupeWindowMs: options.dedupeWindowMs,
    maxQueuedPerTarget: options.maxQueuedPerTarget,
    // Other nodes judge heartbeat staleness from these shares: four per staleness threshold at least.
    seenShareMs: Math.max(25, Math.min(SEEN_SHARE_MS, heartbeatStaleMs(options.pingIntervalMs) / 4)),
    logger,
  });
  return { link: cluster, identities: cluster.identities };
}

/** The node's stores; in a cluster the identities are the cluster's (`sharedIdentities`). */
async function openStores(options: ResolvedOptions, logger: Logger, sharedIdentities: IdentityStore | null): Promise<Stores> {
  const file = (name: string) => path.join(options.dataDir, name);
  const compaction = options.maintenanceIntervalMs;
  const fileMode = options.fileMode;
  // NeDB never settles on a datafile that is a directory: its read error escapes the promise.
  await Promise.all(['identities.db', 'connections.db', 'messages.db', 'queue.db', 'tasks.db'].map((name) => assertNotDirectory(file(name))));
  const opened = await Promise.allSettled([
    sharedIdentities ?? IdentityStore.open(file('identities.db'), logger, compaction, fileMode),
    ConnectionLog.open(file('connections.db'), logger, compaction, fileMode),
    MessageLog.open({
      file: file('messages.db'),
      logger,
      fsync: options.fsync,
      retentionMs: options.retentionMs,
      maxMessages: options.maxMessages,
      maintenanceIntervalMs: options.maintenanceIntervalMs,
      fileMode,
    }),
    DeliveryQueue.open(file('queue.db'), logger, { compactionIntervalMs: compaction, fsync: options.fsync, fileMode }),
    NedbTaskStore.open(file('tasks.db'), logger, { compactionIntervalMs: compaction, fsync: options.fsync, fileMode }),
  ]);
  const [identities, connectionLog, messageLog, queue, tasks] = opened;
  if (
    identities.status === 'fulfilled' &&
    connectionLog.status === 'fulfilled' &&
    messageLog.status === 'fulfilled' &&
    queue.status === 'fulfilled' &&
    tasks.status === 'fulfilled'
  ) {
    return { identities: identities.value, connectionLog: connectionLog.value, messageLog: messageLog.value, queue: queue.value, tasks: tasks.value };
  }
  // Close the stores that did open: their timers and handles would keep a failed process alive.
  await Promise.allSettled(opened.map((store) => (store.status === 'fulfilled' ? store.value.close() : undefined)));
  throw opened.find((store): store is PromiseRejectedResult => store.status === 'rejected')!.reason;
}

/**
 * Rebuilds the dedupe window from the log, so a resend after a restart is still a duplicate.
 * A record whose queued copy never reached queue.db (a crash between the two writes) is left
 * out: its ack was never sent, so the resend must be routed again rather than answered.
 * A task for `any:<tag>` (listed as queued under that name) is written before its record, so
 * its record is always kept.
 */
async function restoreDedupe(dedupe: DedupeCache, messageLog: MessageLog, queue: DeliveryQueue, windowMs: number): Promise<void> {
  if (!dedupe.enabled) return;
  const stillQueued = queue.recordIds();
  for (const { slot, record } of await messageLog.recordsSince(Date.now() - windowMs, DEDUPE_MAX_ENTRIES)) {
    const lostQueueWrite = record.targets.some((t) => t.status === 'queued' && !t.id.startsWith('any:')) && !stillQueued.has(record._id);
    if (!lostQueueWrite) dedupe.remember(record.from_id, record.msg_id, record.timestamp, slot);
  }
}

function listen(server: http.Server | https.Server, port: number, host: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

export async function startRelay(relayOptions: RelayOptions): Promise<RelayHandle> {
  const options = resolveOptions(relayOptions);
  const logger = relayOptions.logger ?? createLogger(options.logLevel);
  const startedAt = Date.now();
  await loadKeyFiles(options, logger);
  const tlsPair = options.tls ? await CertificateReloader.load(options.tls, logger) : null;
  const bossKeys = options.bossKeysFile === undefined ? null : await BossKeys.load(options.bossKeysFile, logger);
  const asDataDirError = async (error: unknown): Promise<never> => {
    throw await dataDirError(options.dataDir, error);
  };
  await prepareDataDir(options.dataDir, options.fileMode, logger).catch(asDataDirError);
  const lock = await lockDataDir(options.dataDir, options.fileMode).catch(asDataDirError);
  let cluster: ClusterLink;
  let stores: Stores;
  try {
    const nodeId = await loadNodeId(options.dataDir, options.nodeId, options.fileMode).catch(asDataDirError);
    const opened = await openClusterLink(options, nodeId, logger);
    cluster = opened.link;
    try {
      stores = await openStores(options, logger, opened.identities).catch(asDataDirError);
    } catch (error) {
      await cluster.close();
      throw error;
    }
  } catch (error) {
    await lock.release();
    throw error;
  }
  const bus = new EventBus();
  if (logger.isEnabled('info')) bus.subscribe(logRelayEvents(logger));
  const dedupe = new DedupeCache(options.dedupeWindowMs, DEDUPE_MAX_ENTRIES);
  await restoreDedupe(dedupe, stores.messageLog, stores.queue, options.dedupeWindowMs).catch(async (error: unknown) => {
    await closeStores(stores, cluster, lock);
    throw await dataDirError(options.dataDir, error);
  });
  // The dispatcher writes through the router's sessions; the router hands it any: targets.
  const link = {
    write: (id: string, text: string) => router.writeTo(id, text),
    settleRecord: (recordId: string, target: string, status: 'delivered' | 'expired') => stores.messageLog.updateTarget(recordId, target, status),
  };
  // A cluster dispatches across its nodes from Redis (lib/redis-dispatch.ts); tasks.db stays unused then.
  let writeElsewhere: (id: string, text: string) => boolean = () => false;
  let dispatcher: TaskDispatch;
  if (cluster instanceof RedisCluster) {
    const shared = cluster;
    try {
      dispatcher = await ClusterDispatch.connect({
        url: options.redisUrl!,
        clusterName: options.clusterName,
        nodeId: cluster.nodeId,
        bus,
        logger,
        link: { write: (id, text) => writeElsewhere(id, text), settleRecord: link.settleRecord },
        locate: (id) => shared.locate(id),
        maxAttempts: options.maxAttempts,
        maxQueueTtlMs: options.maxQueueTtlMs,
      });
    } catch (error) {
      await closeStores(stores, cluster, lock);
      throw error;
    }
  } else {
    const local = new Dispatcher({ store: stores.tasks, bus, logger, link, maxAttempts: options.maxAttempts, maxQueueTtlMs: options.maxQueueTtlMs });
    local.restore(Date.now());
    dispatcher = local;
  }
  const router: Router = new Router({ options, ...stores, dedupe, cluster, dispatcher, bus, logger, bossKeys });
  writeElsewhere = (id, text) => router.writeTo(id, text);
  const gateway = new WsGateway(options, router, bus, logger);
  if (cluster instanceof RedisCluster) gateway.shareAuthFailures(cluster.authFailures);
  // /api/events streams the whole cluster: this node's events, each shared with its sequence
  // number, and those the other nodes share. Metrics and the log keep to this node's own bus.
  const sharedEvents = cluster instanceof RedisCluster ? cluster : null;
  const eventStream = new EventStream({
    bus,
    ...(sharedEvents && { cluster: { nodeId: sharedEvents.nodeId, share: (event: RelayEvent, seq: number) => sharedEvents.shareEvent(event, seq) } }),
  });
  sharedEvents?.streamEvents(eventStream, () => eventReaders?.wanted() ?? false);
  const eventReaders = cluster instanceof RedisCluster ? new ClusterEventReaders(cluster, eventStream) : undefined;
  let otherNodes: OtherNodes | undefined;
  if (cluster instanceof RedisCluster) {
    const shared = cluster;
    shared.answerQueries(async (kind, query) => {
      const checked = kind === 'communications' ? readQuery(query) : null;
      if (checked === null) throw new Error(`unknown or malformed query "${kind.slice(0, 40)}"`);
      return communicationsPage(stores.messageLog, stores.identities, checked);
    });
    otherNodes = {
      communications: async (query) => {
        const { results, missing } = await shared.askAll('communications', query);
        const pages = results.map(readPage).filter((page): page is CommunicationsPage => page !== null);
        return { pages, missing };
      },
    };
  }
  const metrics = new RelayMetrics({
    bus,
    ...(cluster instanceof RedisCluster && { clusterQueueDepth: () => cluster.queuedCopies() }),
    stats: () => ({
      connections: { ...router.countOnline(), unauthenticated: gateway.unauthenticatedCount },
      queueDepth: stores.queue.depth,
      dispatch: dispatcher.counts(),
      stores: { identities: stores.identities.size, connectionEvents: stores.connectionLog.size, messages: stores.messageLog.stats().records },
      bytesIn: gateway.bytesIn,
      bytesOut: gateway.bytesOut,
      eventStreamClients: eventStream.clientCount,
    }),
  });
  // Per node, told apart by a node label once there are several.
  if (cluster.clustered) metrics.registry.setDefaultLabels({ node: cluster.nodeId });
  const extensions: HttpExtensions = {
    dashboard: serveDashboard,
    events: (req, res) => (eventReaders ? eventReaders.handle(req, res) : eventStream.handle(req, res)),
    metrics: (req, res) => metrics.handle(req, res),
  };
  const api = new HttpApi({
    options,
    router,
    dispatcher,
    identities: stores.identities,
    messageLog: stores.messageLog,
    logger,
    startedAt,
    version: packageVersion(),
    // A cluster answers for every node, so two identical calls through a balancer agree.
    activeConnections: cluster.clustered ? () => Math.max(router.online.size, cluster.onlineCount()) : () => router.online.size,
    extensions,
    ...(otherNodes !== undefined && { otherNodes }),
    ...(cluster.clustered && {
      cluster: () => ({ name: options.clusterName, store: cluster.available ? ('up' as const) : ('down' as const), node_connections: router.online.size }),
    }),
  });

  const onRequest: http.RequestListener = (req, res) => api.handle(req, res);
  const server = tlsPair ? https.createServer({ cert: tlsPair.credentials.cert, key: tlsPair.credentials.key }, onRequest) : http.createServer(onRequest);
  // Expect: 100-continue comes to the API too, so it can refuse a body too large before it is sent.
  server.on('checkContinue', (req, res) => api.handle(req, res));
  server.on('upgrade', (req, socket, head) => gateway.handleUpgrade(req, socket, head));
  server.on('clientError', (_error, socket) => socket.destroy());

  const expiry = setInterval(() => {
    const now = Date.now();
    router.expireQueued(now);
    dispatcher.expire(now);
    dedupe.expire(now);
  }, 1000);
  expiry.unref();
  const prune = () =>
    Promise.all([
      stores.connectionLog
        .prune({ retentionMs: options.retentionMs, maxEvents: options.maxMessages })
        .catch((error: Error) => logger.error('connection_log_prune_failed', { error: error.message })),
      options.forgetOfflineAfterMs > 0
        ? router.forgetOffline(options.forgetOfflineAfterMs).catch((error: Error) => logger.error('forget_offline_failed', { error: error.message }))
        : undefined,
    ]);
  const maintenance = setInterval(() => void prune(), options.maintenanceIntervalMs);
  maintenance.unref();
  void prune();
  const stopTimers = () => {
    clearInterval(expiry);
    clearInterval(maintenance);
    eventStream.close();
    dispatcherClosed = dispatcher.close();
  };
  let dispatcherClosed: void | Promise<void> = undefined;

  try {
    await listen(server, options.port, options.host);
  } catch (error) {
    stopTimers();
    gateway.closeAll();
    await dispatcherClosed;
    await closeStores(stores, cluster, lock);
    metrics.close();
    throw error;
  }
  const certificates = tlsPair?.attach(server as https.Server, options.tlsReloadIntervalMs) ?? null;
  const address = server.address();
  const port = typeof address === 'object' && address !== null ? address.port : options.port;
  const reachableHost = options.host === '0.0.0.0' || options.host === '::' ? '127.0.0.1' : options.host;
  const hostForUrl = reachableHost.includes(':') ? `[${reachableHost}]` : reachableHost;
  const httpUrl = `${tlsPair ? 'https' : 'http'}://${hostForUrl}:${port}`;
  logger.info('relay_listening', {
    host: options.host,
    port,
    ws_path: options.wsPath,
    data_dir: options.dataDir,
    node: cluster.nodeId,
    cluster: cluster.clustered ? options.clusterName : null,
    tls: tlsPair !== null,
    cert_valid_to: tlsPair?.credentials.validTo,
  });

  let closing: Promise<void> | null = null;
  const close = () =>
    (closing ??= (async () => {
      stopTimers();
      certificates?.stop();
      server.close();
      gateway.closeAll();
      const grace = setTimeout(() => gateway.terminateAll(), CLOSE_HANDSHAKE_GRACE_MS);
      await waitFor(() => gateway.openSessions === 0, CLOSE_HANDSHAKE_GRACE_MS + 500);
      clearTimeout(grace);
      server.closeAllConnections();
      await dispatcherClosed;
      await closeStores(stores, cluster, lock);
      metrics.close();
      logger.info('relay_closed', {});
    })());

  const reload = async (): Promise<ReloadResult> => {
    const [keys, certificate, bossKeyFile] = await Promise.all([reloadKeyFiles(options, logger), certificates?.reload() ?? ('off' as const), bossKeys ? bossKeys.reload() : ('off' as const)]);
    logger.info('relay_reloaded', { keys_changed: keys.changed, keys_error: keys.error !== null, certificate });
    return { keys, certificate, bossKeys: bossKeyFile };
  };
  return {
    url: `${tlsPair ? 'wss' : 'ws'}://${hostForUrl}:${port}${options.wsPath}`,
    httpUrl,
    port,
    dataDir: options.dataDir,
    nodeId: cluster.nodeId,
    clusterName: cluster.clustered ? options.clusterName : null,
    events: bus,
    reload,
    close,
  };
}

async function closeStores(stores: Stores, cluster: ClusterLink, lock: DataDirLock): Promise<void> {
  // Identities last: disconnects during shutdown update them; the cluster link after them (its
  // identities are written through it), the lock at the very end.
  await Promise.all([stores.messageLog.close(), stores.connectionLog.close(), stores.queue.close(), stores.tasks.close()]);
  await stores.identities.close();
  await cluster.close();
  await lock.release();
}

function waitFor(condition: () => boolean, timeoutMs: number): Promise<void> {
  return new Promise((resolve) => {
    const started = Date.now();
    const check = () => {
      if (condition() || Date.now() - started > timeoutMs) resolve();
      else setTimeout(check, 10);
    };
    check();
  });
}

/**
 * True when this file is the program (`node dist/server.js 8787 my-secret`), not a module some
 * other code imported. In a bundle (the standalone executables) every file shares the bundle's
 * `module`, so the program's exports must also be this file's own.
 */
function isProgram(): boolean {
  const main = require.main;
  return main !== undefined && main === module && (main.exports as { startRelay?: unknown }).startRelay === startRelay;
}

// Run as a program, behave as the mimiclaw-ws command. cli.js imports this module, which is
// complete by now; the path is computed so bundlers do not pull cli.ts in a second time.
if (isProgram()) require(path.join(__dirname, 'cli.js'));
