// `mimiclaw-ws [port] [authkey] [data-dir] [--flags]` → RelayOptions, or a usage error that
// says what to fix. Kept apart from cli.ts so it is tested without spawning processes.

import { isLogLevel, LOG_LEVELS } from './logger';
import { checkRedisUrl, defaultDataDir, normaliseOrigin, OptionsError, parseDuration, resolveOptions, type RelayOptions } from './options';

export class UsageError extends Error {}

export type ParsedCommand = { kind: 'help' } | { kind: 'version' } | { kind: 'run'; options: RelayOptions };

type Kind = 'duration' | 'bytes' | 'count' | 'mode' | 'string' | 'boolean' | 'origins';

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
  'max-payload': { kind: 'bytes', option: 'maxPayloadBytes', help: 'largest frame (default 1MiB, at most 64MiB)' },
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
  redis: { kind: 'string', option: 'redisUrl', help: 'join a cluster whose store is this Redis, e.g. redis://127.0.0.1:6379 (else env MIMICLAW_REDIS_URL; default none: one node)' },
  cluster: { kind: 'string', option: 'clusterName', help: 'cluster name prefixing every Redis key and channel (default mimiclaw)' },
  'node-id': { kind: 'string', option: 'nodeId', help: 'this node\'s id (default: kept in <data-dir>/node-id)' },
  'task-timeout': { kind: 'duration', option: 'taskTimeoutMs', help: 'lease of a task sent to any:<tag> without task_timeout_ms (default 10m)' },
  'max-attempts': { kind: 'count', option: 'maxAttempts', help: 'assignments a dispatched task gets before it fails (default 3)' },
  'authkey-file': { kind: 'string', option: 'authkeyFile', help: 'read the authkey from this file, at start and on SIGHUP (else env MIMICLAW_AUTHKEY_FILE)' },
  'employee-key-file': { kind: 'string', option: 'employeeKeyFile', help: 'read the employee key from this file, at start and on SIGHUP (else env MIMICLAW_EMPLOYEE_KEY_FILE)' },
  'tls-cert': { kind: 'string', option: 'tlsCertFile', help: 'PEM certificate chain: serve wss:// and https:// (needs --tls-key)' },
  'tls-key': { kind: 'string', option: 'tlsKeyFile', help: 'PEM private key of --tls-cert' },
  'tls-reload-interval': { kind: 'duration', option: 'tlsReloadIntervalMs', help: 'how often the TLS files are checked for a renewal (default 1m; 0 = only on SIGHUP)' },
  'allowed-origins': { kind: 'origins', option: 'allowedOrigins', help: 'comma-separated origins whose browser pages may open WebSockets; another Origin gets 403 (default: any)' },
};

const BYTE_UNITS: Record<string, number> = { '': 1, b: 1, kb: 1000, kib: 1024, mb: 1e6, mib: 1024 ** 2, gb: 1e9, gib: 1024 ** 3 };

function parseBytes(text: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const unit = match ? BYTE_UNITS[match[2]!.toLowerCase()] : undefined;
  return match && unit !== undefined ? Math.round(Number(match[1]) * unit) : undefined;
}

function parsePort(text: string, flag = false): number {
  const port = Number(text);
  if (!/^\d+$/.test(text) || port < 0 || port > 65535) {
    throw new UsageError(`${flag ? '--port' : 'Port'} must be a number from 0 to 65535, got "${text}": e.g. mimiclaw-ws 8787 <authkey>.`);
  }
  return port;
}

const EXAMPLES: Record<Exclude<Kind, 'boolean'>, string> = {
  duration: 'a duration like 500ms, 15s, 10m, 2h or 30d (a bare number is seconds)',
  bytes: 'a size like 65536, 512KiB or 1MiB',
  count: 'a whole number like 10',
  mode: 'an octal mode such as 600 or 640',
  string: 'a value',
  origins: 'a comma-separated list of origins such as https://app.example.com,http://localhost:3000 (scheme, host, optional port; no path)',
};

function parseOrigins(name: string, text: string): string[] {
  const entries = text.split(',').map((entry) => entry.trim()).filter((entry) => entry !== '');
  const bad = entries.find((entry) => normaliseOrigin(entry) === undefined);
  if (entries.length === 0 || bad !== undefined) throw new UsageError(`--${name} must be ${EXAMPLES.origins}; got "${bad ?? text}".`);
  return entries;
}

function convert(name: string, kind: Exclude<Kind, 'boolean'>, text: string): string | number | string[] {
  if (kind === 'string') return text;
  if (kind === 'origins') return parseOrigins(name, text);
  if (kind === 'mode') {
    if (!/^(0o?)?[0-7]{3}$/i.test(text)) throw new UsageError(`--${name} must be ${EXAMPLES.mode}; got "${text}".`);
    return parseInt(text.slice(-3), 8);
  }
  if (name === 'port') return parsePort(text, true);
  const value = kind === 'duration' ? parseDuration(text) : kind === 'bytes' ? parseBytes(text) : /^\d+$/.test(text) ? Number(text) : undefined;
  if (value === undefined) throw new UsageError(`--${name} must be ${EXAMPLES[kind]}; got "${text}".`);
  if (!Number.isSafeInteger(value)) throw new UsageError(`--${name} is too large; got "${text}".`);
  return value;
}

function formatBytes(bytes: number): string {
  for (const [unit, size] of [['GiB', 1024 ** 3], ['MiB', 1024 ** 2], ['KiB', 1024]] as const) {
    if (bytes >= size && bytes % size === 0) return `${bytes / size}${unit}`;
  }
  return String(bytes);
}

function formatDuration(ms: number): string {
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return ms >= 86_400_000 ? `${Math.floor(ms / 86_400_000)}d` : `${ms}ms`;
}

/** The range check of resolveOptions, told in the flag's own name and units. */
function flagRangeError(error: OptionsError, given: Map<string, string>): UsageError | undefined {
  const entry = Object.entries(FLAGS).find(([, spec]) => spec.option === error.option);
  if (!entry) return undefined;
  const [name, spec] = entry;
  const typed = given.get(name) ?? '';
  if (name === 'ws-path') return new UsageError(`--ws-path must be a path starting with "/" (no spaces, ? or #), like /ws; got "${typed}".`);
  if (!error.range || spec.kind === 'boolean' || spec.kind === 'string' || spec.kind === 'mode' || spec.kind === 'origins') {
    return new UsageError(error.message.replace(`${spec.option} must`, `--${name} must`).replace(/, got ([^.;]+)\.$/, `; got "${typed}".`));
  }
  const show = spec.kind === 'bytes' ? formatBytes : spec.kind === 'duration' ? formatDuration : String;
  const { min, max } = error.range;
  const range = max >= Number.MAX_SAFE_INTEGER ? `at least ${show(min)}` : `from ${show(min)} to ${show(max)}`;
  return new UsageError(`--${name} must be ${range}${spec.kind === 'count' ? '' : `, ${EXAMPLES[spec.kind]}`}; got "${typed}".`);
}

/** Flags by name, `--name value` or `--name=value`; `--` ends them. Any "-<digit>…" is a value. */
function splitArgs(argv: string[]): { flags: Map<string, string | boolean>; positional: string[]; help: boolean; version: boolean } {
  const flags = new Map<string, string | boolean>();
  const positional: string[] = [];
  let help = false;
  let version = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (arg === '--help' || arg === '-h') {
      help = true;
      continue;
    }
    if (arg === '--version' || arg === '-v') {
      version = true;
      continue;
    }
    if (!arg.startsWith('-') || /^-\d/.test(arg) || arg === '-') {
      positional.push(arg);
      continue;
    }
    const match = /^--(no-)?([^=]+)(?:=(.*))?$/s.exec(arg);
    const spec = match && Object.hasOwn(FLAGS, match[2]!) ? FLAGS[match[2]!] : undefined;
    if (!match || !spec) throw new UsageError(`Unknown option ${arg.split('=')[0]}: run mimiclaw-ws --help for the list.`);
    const [, negated, name, inline] = match as unknown as [string, string | undefined, string, string | undefined];
    if (flags.has(name)) throw new UsageError(`--${name} is given more than once: give it once.`);
    if (spec.kind === 'boolean') {
      if (negated !== undefined && inline !== undefined) throw new UsageError(`--no-${name} takes no value; got "${arg}".`);
      if (inline !== undefined && inline !== 'true' && inline !== 'false') {
        throw new UsageError(`--${name} is a switch: give --${name} (on) or --${name}=false (off); got "${arg}".`);
      }
      flags.set(name, negated === undefined && inline !== 'false');
      continue;
    }
    if (negated !== undefined) throw new UsageError(`Unknown option --no-${name}: --${name} is not a switch; run mimiclaw-ws --help for the list.`);
    const value = inline ?? argv[i + 1];
    if (value === undefined || value === '' || (inline === undefined && value.startsWith('--'))) {
      const example = spec.kind === 'duration' ? '30s' : spec.kind === 'bytes' ? '1MiB' : spec.kind === 'count' ? '10' : spec.kind === 'mode' ? '600' : spec.kind === 'origins' ? 'https://app.example.com' : '<text>';
      throw new UsageError(`--${name} needs a value${spec.kind === 'string' ? '' : `, ${EXAMPLES[spec.kind]}`}, e.g. --${name} ${example}.`);
    }
    if (inline === undefined) i++;
    flags.set(name, value);
  }
  return { flags, positional, help, version };
}

export function parseCommandLine(argv: string[], env: NodeJS.ProcessEnv = process.env): ParsedCommand {
  const { flags, positional, help, version } = splitArgs(argv);
  if (help) return { kind: 'help' };
  if (version) return { kind: 'version' };
  if (positional.length > 3) throw new UsageError(`Too many arguments: mimiclaw-ws [port] [authkey] [data-dir], got ${positional.length}.`);
  const options: Record<string, unknown> = {};
  const typed = new Map<string, string>();
  for (const [name, value] of flags) {
    const spec = FLAGS[name]!;
    typed.set(name, String(value));
    options[spec.option] = spec.kind === 'boolean' ? value : convert(name, spec.kind, String(value));
  }
  const [port, authkey, dataDir] = positional;
  const twice = (what: string, flag: string, value: string) => {
    throw new UsageError(`The ${what} is given twice, as an argument ("${value}") and as --${flag}: give it once.`);
  };
  if (port !== undefined) {
    if (flags.has('port')) twice('port', 'port', port);
    options.port = parsePort(port);
    typed.set('port', port);
  }
  if (authkey !== undefined) {
    if (flags.has('authkey')) twice('authkey', 'authkey', '…');
    options.authkey = authkey;
  }
  if (dataDir !== undefined) {
    if (flags.has('data-dir')) twice('data dir', 'data-dir', dataDir);
    options.dataDir = dataDir;
  }
  keyFromEnv(options, env, 'authkey', 'authkeyFile', 'MIMICLAW_AUTHKEY');
  keyFromEnv(options, env, 'employeeKey', 'employeeKeyFile', 'MIMICLAW_EMPLOYEE_KEY');
  if (options.redisUrl === undefined && env.MIMICLAW_REDIS_URL) {
    if (checkRedisUrlText(env.MIMICLAW_REDIS_URL)) options.redisUrl = env.MIMICLAW_REDIS_URL;
    else throw new UsageError(`MIMICLAW_REDIS_URL must be a redis:// or rediss:// URL such as redis://127.0.0.1:6379; got "${env.MIMICLAW_REDIS_URL.slice(0, 80)}".`);
  }
  options.dataDir ??= defaultDataDir(env);
  if ((typeof options.authkey !== 'string' || options.authkey === '') && options.authkeyFile === undefined) {
    throw new UsageError('No authkey: pass it as the second argument (mimiclaw-ws 8787 <authkey>), with --authkey <key> or --authkey-file <path>, or in env MIMICLAW_AUTHKEY or MIMICLAW_AUTHKEY_FILE.');
  }
  if (options.authkey !== undefined && options.authkeyFile !== undefined) {
    throw new UsageError('Give the authkey once: --authkey (or the second argument) or --authkey-file, not both.');
  }
  if (options.employeeKey !== undefined && options.employeeKeyFile !== undefined) {
    throw new UsageError('Give the employee key once: --employee-key or --employee-key-file, not both.');
  }
  if ((options.tlsCertFile === undefined) !== (options.tlsKeyFile === undefined)) {
    const [given, missing] = options.tlsCertFile === undefined ? ['--tls-key', '--tls-cert'] : ['--tls-cert', '--tls-key'];
    throw new UsageError(`${given} needs ${missing} <file> too: TLS takes the certificate and its key.`);
  }
  if (options.logLevel !== undefined && !isLogLevel(options.logLevel)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}; got "${String(options.logLevel)}".`);
  }
  const relayOptions = options as unknown as RelayOptions;
  // Check every value now, so a bad one is told in the flag's name, not the option's.
  try {
    resolveOptions(relayOptions);
  } catch (error) {
    if (error instanceof OptionsError) throw flagRangeError(error, typed) ?? error;
    throw error;
  }
  return { kind: 'run', options: relayOptions };
}

/** A key not given on the command line comes from env NAME or env NAME_FILE (one of them). */
function keyFromEnv(options: Record<string, unknown>, env: NodeJS.ProcessEnv, key: string, fileKey: string, name: string): void {
  if (options[key] !== undefined || options[fileKey] !== undefined) return;
  const value = env[name] || undefined;
  const file = env[`${name}_FILE`] || undefined;
  if (value !== undefined && file !== undefined) throw new UsageError(`Set ${name} or ${name}_FILE, not both.`);
  if (value !== undefined) options[key] = value;
  if (file !== undefined) options[fileKey] = file;
}

function checkRedisUrlText(text: string): boolean {
  try {
    checkRedisUrl(text);
    return true;
  } catch {
    return false;
  }
}

export function helpText(version: string): string {
  const width = Math.max(...Object.keys(FLAGS).map((name) => name.length)) + 10;
  const lines = Object.entries(FLAGS).map(([name, spec]) => {
    const value = spec.kind === 'boolean' ? '' : spec.kind === 'duration' ? ' <dur>' : spec.kind === 'bytes' ? ' <size>' : spec.kind === 'count' ? ' <n>' : spec.kind === 'mode' ? ' <octal>' : spec.kind === 'origins' ? ' <list>' : ' <text>';
    return `  --${(name + value).padEnd(width)} ${spec.help}`;
  });
  return [
    `mimiclaw-ws ${version}: WebSocket relay between boss and employee agents`,
    '',
    'Usage:',
    '  mimiclaw-ws [port] [authkey] [data-dir] [options]',
    '  mimiclaw-ws connect <ws-url> [options]     (mimiclaw-ws connect --help)',
    '  mimiclaw-ws send <ws-url> [options]        (mimiclaw-ws send --help)',
    '  mimiclaw-ws health [--url <http-url>]      (mimiclaw-ws health --help)',
    '  mimiclaw-ws verify [--data-dir DIR]        check the audit trail (mimiclaw-ws verify --help)',
    '  mimiclaw-ws backup --out FILE              copy the data dir, also while the relay runs',
    '  mimiclaw-ws restore --in FILE [--force]    put a backup back (the relay stopped)',
    '  mimiclaw-ws migrate --redis URL [--force]  move a data dir into a cluster (mimiclaw-ws migrate --help)',
    '',
    'Options:',
    ...lines,
    `  --${'help'.padEnd(width)} this text`,
    `  --${'version'.padEnd(width)} print the version`,
    '',
    'Durations: 500ms, 15s, 10m, 2h, 30d (a bare number is seconds). Sizes: 65536, 512KiB, 1MiB.',
    'Switches: --fsync, --fsync=false or --no-fsync. -- ends the options.',
    '',
  ].join('\n');
}
