// `mimiclaw-ws [port] [authkey] [data-dir] [--flags]` → RelayOptions, or a usage error that
// says what to fix. Kept apart from cli.ts so it is tested without spawning processes.

import minimist from 'minimist';
import { isLogLevel, LOG_LEVELS } from './logger';
import { defaultDataDir, parseDuration, type RelayOptions } from './options';

export class UsageError extends Error {}

export type ParsedCommand = { kind: 'help' } | { kind: 'version' } | { kind: 'run'; options: RelayOptions };

type Kind = 'duration' | 'bytes' | 'count' | 'mode' | 'string' | 'boolean';

/** Every flag: its kind, the option it sets, and its help line. */
const FLAGS: Record<string, { kind: Kind; option: keyof RelayOptions; help: string }> = {
  port: { kind: 'count', option: 'port', help: 'TCP port (default 8787)' },
  host: { kind: 'string', option: 'host', help: 'address to listen on (default 0.0.0.0)' },
  'ws-path': { kind: 'string', option: 'wsPath', help: 'WebSocket path (default /ws)' },
  authkey: { kind: 'string', option: 'authkey', help: 'boss/admin key (else env MIMICLAW_AUTHKEY)' },
  'data-dir': { kind: 'string', option: 'dataDir', help: 'data dir (else env MIMICLAW_RELAY_HOME, else ~/.mimiclaw-relay)' },
  'file-mode': { kind: 'mode', option: 'fileMode', help: 'mode of the data files, octal (default 600; a new data dir gets 700); 640 lets the group read' },
  'auth-timeout': { kind: 'duration', option: 'authTimeoutMs', help: 'close sockets not authenticated in time (default 15s)' },
  'log-level': { kind: 'string', option: 'logLevel', help: `${LOG_LEVELS.join('|')} (default info)` },
  'queue-ttl': { kind: 'duration', option: 'queueTtlMs', help: 'queue every message for offline targets this long (default off: only "queue":true)' },
  'max-queue-ttl': { kind: 'duration', option: 'maxQueueTtlMs', help: 'longest a queued message waits (default 7d)' },
  'max-queued': { kind: 'count', option: 'maxQueuedPerTarget', help: 'most queued messages per target (default 10000)' },
  'dedupe-window': { kind: 'duration', option: 'dedupeWindowMs', help: 'repeated msg_id window (default 10m; 0 = off)' },
  'max-payload': { kind: 'bytes', option: 'maxPayloadBytes', help: 'largest frame (default 1MiB)' },
  'rate-limit': { kind: 'count', option: 'rateLimit', help: 'frames per second per connection (default 0 = off)' },
  'max-targets': { kind: 'count', option: 'maxTargets', help: 'most ids in one "to" array (default 1000)' },
  'max-connections': { kind: 'count', option: 'maxConnections', help: 'most authenticated connections (default 20000)' },
  'max-unauthenticated': { kind: 'count', option: 'maxUnauthenticated', help: 'most sockets waiting to authenticate (default 1000)' },
  'max-auth-failures': { kind: 'count', option: 'maxAuthFailures', help: 'wrong secrets per address and guessed key per minute before refusing (default 20; 0 = no limit)' },
  'throttle-loopback': { kind: 'boolean', option: 'throttleLoopback', help: 'apply --max-auth-failures to loopback clients too (default off)' },
  'ping-interval': { kind: 'duration', option: 'pingIntervalMs', help: 'protocol ping interval; silent for two is dead (default 30s; 0 = off)' },
  'max-buffered': { kind: 'bytes', option: 'maxBufferedBytes', help: 'unsent bytes per socket before target_slow (default 4MiB)' },
  'slow-peer-timeout': { kind: 'duration', option: 'slowPeerTimeoutMs', help: 'disconnect a peer stuck past max-buffered this long (default 30s)' },
  retention: { kind: 'duration', option: 'retentionMs', help: 'keep messages and connection events this long (default 30d; 0 = forever)' },
  'max-messages': { kind: 'count', option: 'maxMessages', help: 'most messages kept in messages.db (default 1000000; 0 = no cap)' },
  'maintenance-interval': { kind: 'duration', option: 'maintenanceIntervalMs', help: 'how often pruning and compaction run (default 10m)' },
  fsync: { kind: 'boolean', option: 'fsync', help: 'fsync the logs after each write batch (default off)' },
  'employee-key': { kind: 'string', option: 'employeeKey', help: 'key employees must send as "employee_key" to register (else env MIMICLAW_EMPLOYEE_KEY; default none)' },
  'public-reads': { kind: 'boolean', option: 'publicReads', help: 'let non-loopback clients read without the authkey (default off)' },
  'forget-offline-after': { kind: 'duration', option: 'forgetOfflineAfterMs', help: 'remove identities offline and unseen this long, checked each maintenance run (default 0 = off)' },
  'boss-keys-file': { kind: 'string', option: 'bossKeysFile', help: 'named boss keys, one name:key or name:sha256:<hex> a line, beside the authkey; reread on SIGHUP' },
};

const BYTE_UNITS: Record<string, number> = { '': 1, b: 1, kb: 1000, kib: 1024, mb: 1e6, mib: 1024 ** 2, gb: 1e9, gib: 1024 ** 3 };

function parseBytes(text: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const unit = match ? BYTE_UNITS[match[2]!.toLowerCase()] : undefined;
  return match && unit !== undefined ? Math.round(Number(match[1]) * unit) : undefined;
}

function parsePort(text: string): number {
  const port = Number(text);
  if (!/^\d+$/.test(text) || port < 0 || port > 65535) {
    throw new UsageError(`Port must be a number from 0 to 65535, got "${text}": e.g. mimiclaw-ws 8787 <authkey>.`);
  }
  return port;
}

function convert(name: string, kind: Kind, raw: unknown): string | number | boolean {
  if (kind === 'boolean') {
    if (typeof raw === 'boolean') return raw;
    throw new UsageError(`--${name} is a switch and takes no value.`);
  }
  if (raw === true || raw === '' || raw === undefined) {
    throw new UsageError(`--${name} needs a value, e.g. --${name} ${kind === 'duration' ? '30s' : kind === 'bytes' ? '1MiB' : kind === 'mode' ? '600' : '10'}.`);
  }
  const text = String(raw);
  if (kind === 'string') return text;
  if (kind === 'mode') {
    if (!/^(0o?)?[0-7]{3}$/i.test(text)) throw new UsageError(`--${name} must be an octal mode such as 600 or 640, got "${text}".`);
    return parseInt(text.slice(-3), 8);
  }
  if (name === 'port') return parsePort(text);
  const value = kind === 'duration' ? parseDuration(text) : kind === 'bytes' ? parseBytes(text) : /^\d+$/.test(text) ? Number(text) : undefined;
  if (value === undefined) {
    const example = kind === 'duration' ? '500ms, 15s, 10m, 2h or 30d (a bare number is seconds)' : kind === 'bytes' ? '65536, 512KiB or 1MiB' : 'a whole number';
    throw new UsageError(`--${name} must be ${example}, got "${text}".`);
  }
  return value;
}

export function parseCommandLine(argv: string[], env: NodeJS.ProcessEnv = process.env): ParsedCommand {
  const booleans = Object.keys(FLAGS).filter((name) => FLAGS[name]!.kind === 'boolean');
  const args = minimist(argv, {
    boolean: [...booleans, 'help', 'version'],
    string: Object.keys(FLAGS).filter((name) => FLAGS[name]!.kind !== 'boolean'),
    alias: { h: 'help', v: 'version' },
    unknown: (arg) => {
      if (arg.startsWith('-')) throw new UsageError(`Unknown option ${arg.split('=')[0]}: run mimiclaw-ws --help for the list.`);
      return true;
    },
  });
  if (args.help) return { kind: 'help' };
  if (args.version) return { kind: 'version' };
  const positional = args._.map(String);
  if (positional.length > 3) throw new UsageError(`Too many arguments: mimiclaw-ws [port] [authkey] [data-dir], got ${positional.length}.`);
  const options: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(FLAGS)) {
    if (args[name] === undefined || (spec.kind === 'boolean' && args[name] === false && !argv.some((a) => a.startsWith(`--${name}`)))) continue;
    options[spec.option] = convert(name, spec.kind, args[name]);
  }
  const [port, authkey, dataDir] = positional;
  if (port !== undefined && options.port === undefined) options.port = parsePort(port);
  if (authkey !== undefined && options.authkey === undefined) options.authkey = authkey;
  if (dataDir !== undefined && options.dataDir === undefined) options.dataDir = dataDir;
  options.authkey ??= env.MIMICLAW_AUTHKEY;
  options.employeeKey ??= env.MIMICLAW_EMPLOYEE_KEY;
  options.dataDir ??= defaultDataDir(env);
  if (typeof options.authkey !== 'string' || options.authkey === '') {
    throw new UsageError('No authkey: pass it as the second argument (mimiclaw-ws 8787 <authkey>), with --authkey <key>, or in env MIMICLAW_AUTHKEY.');
  }
  if (options.logLevel !== undefined && !isLogLevel(options.logLevel)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}, got "${String(options.logLevel)}".`);
  }
  return { kind: 'run', options: options as unknown as RelayOptions };
}

export function helpText(version: string): string {
  const width = Math.max(...Object.keys(FLAGS).map((name) => name.length)) + 10;
  const lines = Object.entries(FLAGS).map(([name, spec]) => {
    const value = spec.kind === 'boolean' ? '' : spec.kind === 'duration' ? ' <dur>' : spec.kind === 'bytes' ? ' <size>' : spec.kind === 'count' ? ' <n>' : spec.kind === 'mode' ? ' <octal>' : ' <text>';
    return `  --${(name + value).padEnd(width)} ${spec.help}`;
  });
  return [
    `mimiclaw-ws ${version}: WebSocket relay between boss and employee agents`,
    '',
    'Usage:',
    '  mimiclaw-ws [port] [authkey] [data-dir] [options]',
    '  mimiclaw-ws connect <ws-url> [options]     (mimiclaw-ws connect --help)',
    '  mimiclaw-ws send <ws-url> [options]        (mimiclaw-ws send --help)',
    '',
    'Options:',
    ...lines,
    `  --${'help'.padEnd(width)} this text`,
    `  --${'version'.padEnd(width)} print the version`,
    '',
    'Durations: 500ms, 15s, 10m, 2h, 30d (a bare number is seconds). Sizes: 65536, 512KiB, 1MiB.',
    '',
  ].join('\n');
}
