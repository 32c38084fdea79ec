// The relay's public entry: startRelay(options) runs one relay and returns its handle. Each call
// builds its own stores, router and servers: there is no module-level state, so one process can
// run several relays.

import http from 'node:http';
import path from 'node:path';
import { BossKeys, type BossKeysReloadResult } from './lib/boss-keys';
import { ConnectionLog } from './lib/connection-log';
import { prepareDataDir } from './lib/data-dir';
import { DedupeCache } from './lib/dedupe-cache';
import { DeliveryQueue } from './lib/delivery-queue';
import { serveDashboard } from './lib/dashboard-page';
import { logRelayEvents } from './lib/event-log';
import { EventStream } from './lib/event-stream';
import { EventBus } from './lib/events';
import { HttpApi, type HttpExtensions } from './lib/http-api';
import { IdentityStore } from './lib/identity-store';
import { createLogger, type Logger } from './lib/logger';
import { MessageLog } from './lib/message-log';
import { RelayMetrics } from './lib/metrics';
import { resolveOptions, type RelayOptions, type ResolvedOptions } from './lib/options';
import { Router } from './lib/router';
import { assertNotDirectory, dataDirError } from './lib/start-errors';
import { packageVersion } from './lib/version';
import { WsGateway } from './lib/ws-gateway';

export type { RelayOptions } from './lib/options';
export { DataDirError } from './lib/start-errors';
export type { RelayEvent } from './lib/events';
export * from './lib/protocol';

export interface RelayHandle {
  /** ws://HOST:PORT/ws (loopback address when listening on all interfaces). */
  url: string;
  /** http://HOST:PORT */
  httpUrl: string;
  port: number;
  dataDir: string;
  events: EventBus;
  /**
   * What SIGHUP does: reads the boss keys file again. New keys apply to auths from then on;
   * sessions of a boss whose key was removed or changed are closed (4009). A file that fails
   * to read or parse keeps the keys in use.
   */
  reload(): Promise<ReloadResult>;
  /** Closes every socket with 1001, finishes pending writes, closes the stores. */
  close(): Promise<void>;
}

export interface ReloadResult {
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
}

async function openStores(options: ResolvedOptions, logger: Logger): Promise<Stores> {
  await prepareDataDir(options.dataDir, options.fileMode, logger);
  const file = (name: string) => path.join(options.dataDir, name);
  const compaction = options.maintenanceIntervalMs;
  const fileMode = options.fileMode;
  // NeDB never settles on a datafile that is a directory: its read error escapes the promise.
  await Promise.all(['identities.db', 'connections.db', 'messages.db', 'queue.db'].map((name) => assertNotDirectory(file(name))));
  const opened = await Promise.allSettled([
    IdentityStore.open(file('identities.db'), logger, compaction, fileMode),
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
  ]);
  const [identities, connectionLog, messageLog, queue] = opened;
  if (identities.status === 'fulfilled' && connectionLog.status === 'fulfilled' && messageLog.status === 'fulfilled' && queue.status === 'fulfilled') {
    return { identities: identities.value, connectionLog: connectionLog.value, messageLog: messageLog.value, queue: queue.value };
  }
  // Close the stores that did open: their timers and handles would keep a failed process alive.
  await Promise.allSettled(opened.map((store) => (store.status === 'fulfilled' ? store.value.close() : undefined)));
  throw opened.find((store): store is PromiseRejectedResult => store.status === 'rejected')!.reason;
}

/**
 * Rebuilds the dedupe window from the log, so a resend after a restart is still a duplicate.
 * A record whose queued copy never reached queue.db (a crash between the two writes) is left
 * out: its ack was never sent, so the resend must be routed again rather than answered.
 */
async function restoreDedupe(dedupe: DedupeCache, messageLog: MessageLog, queue: DeliveryQueue, windowMs: number): Promise<void> {
  if (!dedupe.enabled) return;
  const stillQueued = queue.recordIds();
  for (const { slot, record } of await messageLog.recordsSince(Date.now() - windowMs, DEDUPE_MAX_ENTRIES)) {
    const lostQueueWrite = record.targets.some((t) => t.status === 'queued') && !stillQueued.has(record._id);
    if (!lostQueueWrite) dedupe.remember(record.from_id, record.msg_id, record.timestamp, slot);
  }
}

function listen(server: http.Server, port: number, host: string): Promise<void> {
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
  const bossKeys = options.bossKeysFile === undefined ? null : await BossKeys.load(options.bossKeysFile, logger);
  const stores = await openStores(options, logger).catch(async (error: unknown) => {
    throw await dataDirError(options.dataDir, error);
  });
  const bus = new EventBus();
  if (logger.isEnabled('info')) bus.subscribe(logRelayEvents(logger));
  const dedupe = new DedupeCache(options.dedupeWindowMs, DEDUPE_MAX_ENTRIES);
  await restoreDedupe(dedupe, stores.messageLog, stores.queue, options.dedupeWindowMs).catch(async (error: unknown) => {
    await closeStores(stores);
    throw await dataDirError(options.dataDir, error);
  });
  const router = new Router({ options, ...stores, dedupe, bus, logger, bossKeys });
  const gateway = new WsGateway(options, router, bus, logger);
  const eventStream = new EventStream({ bus });
  const metrics = new RelayMetrics({
    bus,
    stats: () => ({
      connections: { ...router.countOnline(), unauthenticated: gateway.unauthenticatedCount },
      queueDepth: stores.queue.depth,
      stores: { identities: stores.identities.size, connectionEvents: stores.connectionLog.size, messages: stores.messageLog.stats().records },
      bytesIn: gateway.bytesIn,
      bytesOut: gateway.bytesOut,
      eventStreamClients: eventStream.clientCount,
    }),
  });
  const extensions: HttpExtensions = {
    dashboard: serveDashboard,
    events: (req, res) => eventStream.handle(req, res),
    metrics: (req, res) => metrics.handle(req, res),
  };
  const api = new HttpApi({
    options,
    router,
    identities: stores.identities,
    messageLog: stores.messageLog,
    logger,
    startedAt,
    version: packageVersion(),
    activeConnections: () => router.online.size,
    extensions,
  });

  const server = http.createServer((req, res) => api.handle(req, res));
  // Expect: 100-continue comes to the API too, so it can refuse a body too large before it is sent.
  server.on('checkContinue', (req, res) => api.handle(req, res));
  server.on('upgrade', (req, socket, head) => gateway.handleUpgrade(req, socket, head));
  server.on('clientError', (_error, socket) => socket.destroy());

  const expiry = setInterval(() => {
    const now = Date.now();
    router.expireQueued(now);
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
  };

  try {
    await listen(server, options.port, options.host);
  } catch (error) {
    stopTimers();
    gateway.closeAll();
    await closeStores(stores);
    metrics.close();
    throw error;
  }
  const address = server.address();
  const port = typeof address === 'object' && address !== null ? address.port : options.port;
  const reachableHost = options.host === '0.0.0.0' || options.host === '::' ? '127.0.0.1' : options.host;
  const hostForUrl = reachableHost.includes(':') ? `[${reachableHost}]` : reachableHost;
  const httpUrl = `http://${hostForUrl}:${port}`;
  logger.info('relay_listening', { host: options.host, port, ws_path: options.wsPath, data_dir: options.dataDir });

  let closing: Promise<void> | null = null;
  const close = () =>
    (closing ??= (async () => {
      stopTimers();
      server.close();
      gateway.closeAll();
      const grace = setTimeout(() => gateway.terminateAll(), CLOSE_HANDSHAKE_GRACE_MS);
      await waitFor(() => gateway.openSessions === 0, CLOSE_HANDSHAKE_GRACE_MS + 500);
      clearTimeout(grace);
      server.closeAllConnections();
      await closeStores(stores);
      metrics.close();
      logger.info('relay_closed', {});
    })());

  const reload = async (): Promise<ReloadResult> => ({ bossKeys: bossKeys ? await bossKeys.reload() : 'off' });

  return { url: `ws://${hostForUrl}:${port}${options.wsPath}`, httpUrl, port, dataDir: options.dataDir, events: bus, reload, close };
}

async function closeStores(stores: Stores): Promise<void> {
  // Identities last: disconnects during shutdown update them.
  await Promise.all([stores.messageLog.close(), stores.connectionLog.close(), stores.queue.close()]);
  await stores.identities.close();
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
