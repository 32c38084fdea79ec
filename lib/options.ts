// The relay's settings: what startRelay() accepts, their defaults, and their validation.
// The CLI maps flags onto RelayOptions; embedders pass them directly.

import os from 'node:os';
import path from 'node:path';
import type { LogLevel, Logger } from './logger';

export interface RelayOptions {
  /** TCP port; 0 picks a free one. Default 8787. */
  port?: number;
  /** Default 0.0.0.0. */
  host?: string;
  /** Default /ws. */
  wsPath?: string;
  /** The boss (and admin write) key. Required unless authkeyFile is given. */
  authkey?: string;
  /** Default ~/.mimiclaw-relay or MIMICLAW_RELAY_HOME. */
  dataDir?: string;
  /** Permission bits of the data files (e.g. 0o640); a dir the relay creates gets them plus search bits. Default 0o600. */
  fileMode?: number;
  /** Close sockets that have not authenticated after this many ms. Default 15000. */
  authTimeoutMs?: number;
  /** Default info. Ignored when `logger` is given. */
  logLevel?: LogLevel;
  logger?: Logger;

  // ---- part B (see README "Reliability and security") ----
  /** When > 0, every message to an offline known target is queued with this TTL (ms). Default 0: only `queue:true` messages are. */
  queueTtlMs?: number;
  /** TTL for a `queue:true` message that gives no ttl_ms, and the cap on any ttl_ms. Default 7 days. */
  maxQueueTtlMs?: number;
  /** Most queued messages held for one target; older ones are dropped as expired past it. Default 10000. */
  maxQueuedPerTarget?: number;
  /** Repeated msg_id window, ms. Default 10 minutes. */
  dedupeWindowMs?: number;
  /** Largest accepted frame, bytes. Default 1 MiB. */
  maxPayloadBytes?: number;
  /** Messages per second per connection (token bucket, burst of one second); 0 = off. Default 0. */
  rateLimit?: number;
  /** Most ids in one message's `to` array. Default 1000. */
  maxTargets?: number;
  /** Most authenticated connections. Default 20000. */
  maxConnections?: number;
  /** Most sockets waiting to authenticate. Default 1000. */
  maxUnauthenticated?: number;
  /** Wrong secrets allowed per address and per secret guessed at (authkey, employee key, one identity's key) per minute before auths presenting it are refused; 0 = no limit. Default 20. */
  maxAuthFailures?: number;
  /** Apply the maxAuthFailures throttle to loopback clients too. Default false. */
  throttleLoopback?: boolean;
  /** WebSocket ping interval, ms; a peer silent for two intervals is terminated. Default 30000. */
  pingIntervalMs?: number;
  /** Per-socket unsent bytes past which messages to it fail with target_slow. Default 4 MiB. */
  maxBufferedBytes?: number;
  /** A socket stuck past maxBufferedBytes this long is disconnected, ms. Default 30000. */
  slowPeerTimeoutMs?: number;
  /** Drop messages and connection events older than this, ms; 0 keeps all. Default 30 days. */
  retentionMs?: number;
  /** Keep at most this many messages in messages.db; 0 = no cap. Default 1,000,000. */
  maxMessages?: number;
  /** fsync the logs after each write batch. Default false. */
  fsync?: boolean;
  /** When set, an employee must present it (auth field `employee_key`) to register. */
  employeeKey?: string;
  /** Let non-loopback clients use read endpoints without the authkey. Default false. */
  publicReads?: boolean;
  /** How often pruning and compaction run, ms. Default 10 minutes. */
  maintenanceIntervalMs?: number;

  // ---- part D (docs/CLUSTER.md) ----
  /** redis:// or rediss:// URL of the cluster store: joins this node to a cluster. Default none: a single node. */
  redisUrl?: string;
  /** Prefix of every cluster key and channel, so several clusters can share one Redis. Default "mimiclaw". */
  clusterName?: string;
  /** This node's id; default the one kept in <data-dir>/node-id (made on first start). */
  nodeId?: string;
  // ---- part C (see README "Dispatch") ----
  /** Lease of a task sent to `any:<tag>` when the message gives no task_timeout_ms, ms. Default 10 minutes. */
  taskTimeoutMs?: number;
  /** Assignments a dispatched task gets before it fails. Default 3. */
  maxAttempts?: number;

  // ---- running in production (see README "Running in production") ----
  /** Read the authkey from this file, at start and on reload(), instead of passing `authkey`. */
  authkeyFile?: string;
  /** Read the employee key from this file, at start and on reload(), instead of passing `employeeKey`. */
  employeeKeyFile?: string;
  /** PEM certificate (chain) file; with tlsKeyFile the port serves wss:// and https:// instead of ws:// and http://. */
  tlsCertFile?: string;
  /** PEM private key file of that certificate. */
  tlsKeyFile?: string;
  /** How often the TLS files are checked for a renewal, ms; 0 = only on reload(). Default 1 minute. */
  tlsReloadIntervalMs?: number;
  /** Origins (e.g. https://app.example.com) whose pages may open WebSockets; an upgrade with another Origin header gets 403. Empty (default): any. */
  allowedOrigins?: string[];
  // ---- identity lifecycle and boss keys (see README "Admin API" and "Secrets") ----
  /** Remove identities offline and not seen for this long, ms, checked at each maintenance run; 0 = keep them. Default 0. */
  forgetOfflineAfterMs?: number;
  /** File of named boss credentials (`name:key` or `name:sha256:<hex>` per line), accepted beside the authkey; read again on reload. */
  bossKeysFile?: string;
}

type OptionalSettings = 'logger' | 'employeeKey' | 'redisUrl' | 'nodeId' | 'authkeyFile' | 'employeeKeyFile' | 'tlsCertFile' | 'tlsKeyFile' | 'bossKeysFile';

export type ResolvedOptions = Required<Omit<RelayOptions, OptionalSettings>> & {
  employeeKey: string | undefined;
  redisUrl: string | undefined;
  nodeId: string | undefined;
  authkeyFile: string | undefined;
  employeeKeyFile: string | undefined;
  /** Both TLS files, or null for plain ws:// and http://. */
  tls: { certFile: string; keyFile: string } | null;
  bossKeysFile: string | undefined;
};

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const NAME_RULE = '1 to 63 letters, digits, ".", "_" or "-", starting with a letter or digit';

const MINUTE = 60_000;
const DAY = 24 * 60 * MINUTE;

export const DEFAULTS = {
  port: 8787,
  host: '0.0.0.0',
  wsPath: '/ws',
  fileMode: 0o600,
  authTimeoutMs: 15_000,
  logLevel: 'info' as LogLevel,
  queueTtlMs: 0,
  maxQueueTtlMs: 7 * DAY,
  maxQueuedPerTarget: 10_000,
  dedupeWindowMs: 10 * MINUTE,
  maxPayloadBytes: 1024 * 1024,
  rateLimit: 0,
  maxTargets: 1000,
  maxConnections: 20_000,
  maxUnauthenticated: 1000,
  maxAuthFailures: 20,
  throttleLoopback: false,
  pingIntervalMs: 30_000,
  maxBufferedBytes: 4 * 1024 * 1024,
  slowPeerTimeoutMs: 30_000,
  retentionMs: 30 * DAY,
  maxMessages: 1_000_000,
  fsync: false,
  publicReads: false,
  maintenanceIntervalMs: 10 * MINUTE,
  forgetOfflineAfterMs: 0,
  clusterName: 'mimiclaw',
  taskTimeoutMs: 10 * MINUTE,
  maxAttempts: 3,
  tlsReloadIntervalMs: MINUTE,
} as const;

export function defaultDataDir(env: NodeJS.ProcessEnv = process.env): string {
  const fromEnv = env.MIMICLAW_RELAY_HOME;
  return fromEnv && fromEnv.trim() !== '' ? path.resolve(fromEnv) : path.join(os.homedir(), '.mimiclaw-relay');
}

export class OptionsError extends Error {
  constructor(
    message: string,
    /** The option at fault, and the range it must be in, so the command can name its own flag. */
    readonly option?: keyof RelayOptions,
    readonly range?: { min: number; max: number },
  ) {
    super(message);
    this.name = 'OptionsError';
  }
}

/** Timers cannot wait longer (Node fires a longer one after 1 ms). */
export const MAX_TIMER_MS = 2 ** 31 - 1;
/** A frame is read whole and decoded as one string; V8's strings stop at about 512 MiB. */
export const MAX_PAYLOAD_BYTES = 64 * 1024 * 1024;

function wholeNumber(name: keyof RelayOptions, value: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new OptionsError(`${name} must be a whole number from ${min} to ${max}, got ${String(value)}.`, name, { min, max });
  }
  return value;
}

/** Permission bits the relay can live with: it must read and write its own files. */
function fileModeOption(value: number | undefined): number {
  const mode = value ?? DEFAULTS.fileMode;
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) {
    throw new OptionsError(`fileMode must be permission bits such as 0o600 or 0o640 (--file-mode 640), got ${String(value)}.`, 'fileMode');
  }
  if ((mode & 0o600) !== 0o600) {
    throw new OptionsError(`fileMode must give the owner read and write (the relay rewrites its files), e.g. 0o600 or 0o640; got 0o${mode.toString(8)}.`, 'fileMode');
  }
  return mode;
}

/** "https://app.example.com" (scheme, host and port, as browsers send it), or "null". */
export function normaliseOrigin(text: string): string | undefined {
  const trimmed = text.trim();
  if (trimmed === 'null') return 'null';
  let url: URL;
  try {
    url = new URL(trimmed);
  } catch {
    return undefined;
  }
  if ((url.protocol !== 'http:' && url.protocol !== 'https:') || url.pathname !== '/' || url.search !== '' || url.hash !== '' || url.username !== '') {
    return undefined;
  }
  return url.origin;
}

function allowedOriginsOption(value: string[] | undefined): string[] {
  return (value ?? []).map((entry) => {
    const origin = normaliseOrigin(entry);
    if (origin === undefined) {
      throw new OptionsError(`allowedOrigins entries must be origins such as https://app.example.com or http://localhost:3000 (scheme, host, optional port; no path), got "${entry}".`, 'allowedOrigins');
    }
    return origin;
  });
}

function tlsOption(options: RelayOptions): ResolvedOptions['tls'] {
  const { tlsCertFile: certFile, tlsKeyFile: keyFile } = options;
  if (!certFile && !keyFile) return null;
  if (!certFile || !keyFile) {
    throw new OptionsError('TLS needs both files: give the certificate with --tls-cert <file> (tlsCertFile) and its key with --tls-key <file> (tlsKeyFile).');
  }
  return { certFile: path.resolve(certFile), keyFile: path.resolve(keyFile) };
}

/**
 * Fills defaults and rejects impossible values with a message that names the option. A key
 * given by file is left empty here: startRelay reads the file (lib/secret-files.ts).
 */
export function resolveOptions(options: RelayOptions): ResolvedOptions {
  const authkeyFile = options.authkeyFile || undefined;
  const employeeKeyFile = options.employeeKeyFile || undefined;
  if (authkeyFile !== undefined && options.authkey) {
    throw new OptionsError('Give the authkey once: either --authkey <key> (authkey) or --authkey-file <path> (authkeyFile), not both.');
  }
  if (employeeKeyFile !== undefined && options.employeeKey) {
    throw new OptionsError('Give the employee key once: either --employee-key <key> (employeeKey) or --employee-key-file <path> (employeeKeyFile), not both.');
  }
  if (authkeyFile === undefined && (typeof options.authkey !== 'string' || options.authkey === '')) {
    throw new OptionsError('An authkey is required: pass --authkey <key>, --authkey-file <path>, the second positional argument, or set MIMICLAW_AUTHKEY or MIMICLAW_AUTHKEY_FILE.');
  }
  const wsPath = options.wsPath ?? DEFAULTS.wsPath;
  if (!wsPath.startsWith('/') || /[?#\s]/.test(wsPath)) {
    throw new OptionsError(`wsPath must be a path starting with "/", got "${wsPath}".`, 'wsPath');
  }
  const ms = (name: keyof RelayOptions, value: number | undefined, fallback: number, min = 0, max?: number) =>
    wholeNumber(name, value ?? fallback, min, max);
  const resolved: ResolvedOptions = {
    port: wholeNumber('port', options.port ?? DEFAULTS.port, 0, 65535),
    host: options.host ?? DEFAULTS.host,
    wsPath,
    authkey: options.authkey ?? '',
    dataDir: path.resolve(options.dataDir ?? defaultDataDir()),
    fileMode: fileModeOption(options.fileMode),
    authTimeoutMs: ms('authTimeoutMs', options.authTimeoutMs, DEFAULTS.authTimeoutMs, 1, MAX_TIMER_MS),
    logLevel: options.logLevel ?? DEFAULTS.logLevel,
    queueTtlMs: ms('queueTtlMs', options.queueTtlMs, DEFAULTS.queueTtlMs),
    maxQueueTtlMs: ms('maxQueueTtlMs', options.maxQueueTtlMs, DEFAULTS.maxQueueTtlMs, 1),
    maxQueuedPerTarget: ms('maxQueuedPerTarget', options.maxQueuedPerTarget, DEFAULTS.maxQueuedPerTarget, 1),
    dedupeWindowMs: ms('dedupeWindowMs', options.dedupeWindowMs, DEFAULTS.dedupeWindowMs),
    maxPayloadBytes: ms('maxPayloadBytes', options.maxPayloadBytes, DEFAULTS.maxPayloadBytes, 1024, MAX_PAYLOAD_BYTES),
    rateLimit: ms('rateLimit', options.rateLimit, DEFAULTS.rateLimit),
    maxTargets: ms('maxTargets', options.maxTargets, DEFAULTS.maxTargets, 1),
    maxConnections: ms('maxConnections', options.maxConnections, DEFAULTS.maxConnections, 1),
    maxUnauthenticated: ms('maxUnauthenticated', options.maxUnauthenticated, DEFAULTS.maxUnauthenticated, 1),
    maxAuthFailures: ms('maxAuthFailures', options.maxAuthFailures, DEFAULTS.maxAuthFailures),
    throttleLoopback: options.throttleLoopback ?? DEFAULTS.throttleLoopback,
    pingIntervalMs: ms('pingIntervalMs', options.pingIntervalMs, DEFAULTS.pingIntervalMs, 0, MAX_TIMER_MS),
    maxBufferedBytes: ms('maxBufferedBytes', options.maxBufferedBytes, DEFAULTS.maxBufferedBytes, 1024),
    slowPeerTimeoutMs: ms('slowPeerTimeoutMs', options.slowPeerTimeoutMs, DEFAULTS.slowPeerTimeoutMs, 1, MAX_TIMER_MS),
    retentionMs: ms('retentionMs', options.retentionMs, DEFAULTS.retentionMs),
    maxMessages: ms('maxMessages', options.maxMessages, DEFAULTS.maxMessages),
    fsync: options.fsync ?? DEFAULTS.fsync,
    employeeKey: options.employeeKey === '' ? undefined : options.employeeKey,
    publicReads: options.publicReads ?? DEFAULTS.publicReads,
    maintenanceIntervalMs: ms('maintenanceIntervalMs', options.maintenanceIntervalMs, DEFAULTS.maintenanceIntervalMs, 1000, MAX_TIMER_MS),
    forgetOfflineAfterMs: ms('forgetOfflineAfterMs', options.forgetOfflineAfterMs, DEFAULTS.forgetOfflineAfterMs),
    bossKeysFile: options.bossKeysFile ? path.resolve(options.bossKeysFile) : undefined,
    redisUrl: checkRedisUrl(options.redisUrl),
    clusterName: checkName('clusterName', options.clusterName ?? DEFAULTS.clusterName),
    nodeId: options.nodeId === undefined ? undefined : checkName('nodeId', options.nodeId),
    taskTimeoutMs: ms('taskTimeoutMs', options.taskTimeoutMs, DEFAULTS.taskTimeoutMs, 1, MAX_TIMER_MS),
    maxAttempts: wholeNumber('maxAttempts', options.maxAttempts ?? DEFAULTS.maxAttempts, 1, 1000),
    authkeyFile: authkeyFile && path.resolve(authkeyFile),
    employeeKeyFile: employeeKeyFile && path.resolve(employeeKeyFile),
    tls: tlsOption(options),
    tlsReloadIntervalMs: ms('tlsReloadIntervalMs', options.tlsReloadIntervalMs, DEFAULTS.tlsReloadIntervalMs, 0, MAX_TIMER_MS),
    allowedOrigins: allowedOriginsOption(options.allowedOrigins),
  };
  return resolved;
}

export function checkName(option: 'clusterName' | 'nodeId', value: string): string {
  if (!NAME_PATTERN.test(value)) throw new OptionsError(`${option} must be ${NAME_RULE}, got "${value.slice(0, 80)}".`, option);
  return value;
}

export function checkRedisUrl(value: string | undefined): string | undefined {
  if (value === undefined || value === '') return undefined;
  let url: URL | null = null;
  try {
    url = new URL(value);
  } catch {
    url = null;
  }
  if (url === null || (url.protocol !== 'redis:' && url.protocol !== 'rediss:') || url.hostname === '') {
    throw new OptionsError(`redisUrl must be a redis:// or rediss:// URL such as redis://127.0.0.1:6379, got "${value.slice(0, 80)}".`, 'redisUrl');
  }
  return value;
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: MINUTE, h: 60 * MINUTE, d: DAY };

/** "500ms", "15s", "10m", "2h", "30d"; a bare number is seconds. */
export function parseDuration(text: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!match) return undefined;
  const amount = Number(match[1]);
  const unit = DURATION_UNITS[match[2] ?? 's'] ?? 1000;
  const value = Math.round(amount * unit);
  return Number.isSafeInteger(value) ? value : undefined;
}
