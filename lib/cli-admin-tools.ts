// `mimiclaw-ws verify`, `backup` and `restore`: the data dir's audit trail and its copies, from
// the shell. Exit codes: 0 ok (verify: intact), 1 failed (verify: a broken link), 2 bad arguments.

import { describeReport, verifyDataDir } from './audit-chain';
import { backupDataDir, BackupError, restoreDataDir } from './backup';
import { ArgsError, parseKnownFlags } from './cli-flags';
import { defaultDataDir } from './options';
import { packageVersion } from './version';

export const VERIFY_USAGE = 'usage: mimiclaw-ws verify [--data-dir DIR] [--json]';
export const BACKUP_USAGE = 'usage: mimiclaw-ws backup [--data-dir DIR] --out FILE';
export const RESTORE_USAGE = 'usage: mimiclaw-ws restore [--data-dir DIR] --in FILE [--force]';

const HELP: Record<Tool, string> = {
  verify: `${VERIFY_USAGE}

Checks the audit trail of messages.db and connections.db: every record's hash against the
record before it. Prints "intact: N records checked" (exit 0) or the first broken link with
its file, line and record id (exit 1). Records older than the audit trail are counted as
unchained. Safe while the relay runs.

  --data-dir DIR    the relay's data dir (else env MIMICLAW_RELAY_HOME, else ~/.mimiclaw-relay)
  --json            print the whole report as JSON (with each chain's start, anchor and head)
`,
  backup: `${BACKUP_USAGE}

Copies every store file of the data dir into one bundle FILE, each cut after its last complete
line, so it is consistent while the relay runs. Prints what it copied (exit 0).

  --data-dir DIR    the relay's data dir (else env MIMICLAW_RELAY_HOME, else ~/.mimiclaw-relay)
  --out FILE        the bundle to write (replaced if it exists)
`,
  restore: `${RESTORE_USAGE}

Puts a bundle written by \`mimiclaw-ws backup\` back into a data dir, after checking every
file's size and SHA-256. Refuses a dir a relay is running on, and a non-empty dir unless --force
(which replaces its store files). Identities reconnect with their ids and keys.

  --data-dir DIR    the data dir to restore into (else env MIMICLAW_RELAY_HOME, else ~/.mimiclaw-relay)
  --in FILE         the bundle (or give it as the only argument)
  --force           replace the store files of a non-empty data dir
`,
};

type Tool = 'verify' | 'backup' | 'restore';

export interface Parsed {
  help: boolean;
  dataDir: string;
  strings: Record<string, string | undefined>;
  flags: Record<string, boolean>;
  positional: string[];
}

export function parse(argv: string[], strings: string[], booleans: string[]): Parsed {
  const args = parseKnownFlags(argv, ['data-dir', ...strings], booleans);
  const value = (name: string): string | undefined => {
    const raw: unknown = args[name];
    if (raw === undefined) return undefined;
    if (Array.isArray(raw)) throw new ArgsError(`--${name} was given more than once`);
    if (String(raw).trim() === '') throw new ArgsError(`--${name} needs a value`);
    return String(raw);
  };
  return {
    help: args.help === true,
    dataDir: value('data-dir') ?? defaultDataDir(),
    strings: Object.fromEntries(strings.map((name) => [name, value(name)])),
    flags: Object.fromEntries(booleans.map((name) => [name, args[name] === true])),
    positional: args._.map(String),
  };
}

function usageFailure(tool: Tool, error: unknown): number {
  if (!(error instanceof ArgsError)) throw error;
  process.stderr.write(`mimiclaw-ws ${tool}: ${error.message}\n${tool === 'verify' ? VERIFY_USAGE : tool === 'backup' ? BACKUP_USAGE : RESTORE_USAGE}\n`);
  return 2;
}

function failure(tool: Tool, error: unknown): number {
  const message = error instanceof BackupError ? error.message : `${(error as Error).message ?? String(error)}`;
  process.stderr.write(`mimiclaw-ws ${tool}: ${message}\n`);
  return 1;
}

export async function runVerify(argv: string[]): Promise<number> {
  let parsed: Parsed;
  try {
    parsed = parse(argv, [], ['json']);
    if (parsed.positional.length > 0) throw new ArgsError(`unexpected argument ${parsed.positional[0]!}`);
  } catch (error) {
    return usageFailure('verify', error);
  }
  if (parsed.help) {
    process.stdout.write(HELP.verify);
    return 0;
  }
  try {
    const report = await verifyDataDir(parsed.dataDir);
    if (report.files.every((f) => f.status === 'absent')) {
      process.stderr.write(`mimiclaw-ws verify: no messages.db or connections.db in ${parsed.dataDir}: give the relay's --data-dir.\n`);
      return 1;
    }
    process.stdout.write(parsed.flags.json ? `${JSON.stringify(report)}\n` : `${describeReport(report)}\n`);
    return report.intact ? 0 : 1;
  } catch (error) {
    return failure('verify', error);
  }
}

export async function runBackup(argv: string[]): Promise<number> {
  let parsed: Parsed;
  try {
    parsed = parse(argv, ['out'], []);
    if (parsed.help) {
      process.stdout.write(HELP.backup);
      return 0;
    }
    if (parsed.positional.length > 0) throw new ArgsError(`unexpected argument ${parsed.positional[0]!}`);
    if (parsed.strings.out === undefined) throw new ArgsError('missing --out FILE');
  } catch (error) {
    return usageFailure('backup', error);
  }
  try {
    const result = await backupDataDir(parsed.dataDir, parsed.strings.out!, packageVersion());
    const files = result.files.map((f) => `${f.file} ${f.bytes} bytes`).join(', ');
    process.stdout.write(`backup written to ${result.out}: ${files}\n`);
    return 0;
  } catch (error) {
    return failure('backup', error);
  }
}

export async function runRestore(argv: string[]): Promise<number> {
  let parsed: Parsed;
  let bundle: string;
  try {
    parsed = parse(argv, ['in'], ['force']);
    if (parsed.help) {
      process.stdout.write(HELP.restore);
      return 0;
    }
    if (parsed.positional.length > 1 || (parsed.positional.length === 1 && parsed.strings.in !== undefined)) {
      throw new ArgsError(`unexpected argument ${parsed.positional[parsed.positional.length - 1]!}`);
    }
    const given = parsed.strings.in ?? parsed.positional[0];
    if (given === undefined) throw new ArgsError('missing --in FILE (the bundle `mimiclaw-ws backup` wrote)');
    bundle = given;
  } catch (error) {
    return usageFailure('restore', error);
  }
  try {
    const result = await restoreDataDir(bundle, parsed.dataDir, parsed.flags.force === true);
    const files = result.files.map((f) => `${f.file} ${f.bytes} bytes`).join(', ');
    const taken = result.createdAt === null ? '' : ` (backup of ${new Date(result.createdAt).toISOString()})`;
    process.stdout.write(`restored into ${result.dataDir}${taken}: ${files}\n`);
    return 0;
  } catch (error) {
    return failure('restore', error);
  }
}
