// `mimiclaw-ws migrate`: a single node's data dir into a cluster's Redis (lib/cluster-migrate.ts).
// Exit codes: 0 migrated, 1 failed (nothing or, for a failure half-way, part of it written:
// running it again is safe), 2 bad arguments.

import { parse, type Parsed } from './cli-admin-tools';
import { ArgsError } from './cli-flags';
import { describeResult, MigrateError, migrateDataDir, type MigrateOptions } from './cluster-migrate';
import { checkName, checkRedisUrl, DEFAULTS, OptionsError } from './options';
import { ClusterStartError, printableUrl } from './redis-connection';

export const MIGRATE_USAGE = 'usage: mimiclaw-ws migrate --redis URL [--cluster NAME] [--data-dir DIR] [--force]';

const HELP = `${MIGRATE_USAGE}

Moves a single relay's data dir into a cluster: writes its identities (ids, key hashes, roles,
profiles, bans) and its queued messages (in order per target, with their expiry) into the
cluster's Redis, so every employee and boss reconnects to any node with its old id and key and
gets its queued messages there. Stop the relay first (refused while it holds the data dir).
Prints what it carried (exit 0). Refused, writing nothing, when the cluster already has any
of these identities, unless --force. The data dir is left as it was (the relay's own start-up
upgrades apply: an old data dir's clear keys become hashes, a missing node-id file is made).
Queued messages whose TTL has passed are left out.

  --redis URL       the cluster's Redis, e.g. redis://127.0.0.1:6379 (else env MIMICLAW_REDIS_URL)
  --cluster NAME    the cluster's name, as its nodes' --cluster (default ${DEFAULTS.clusterName})
  --data-dir DIR    the single relay's data dir (else env MIMICLAW_RELAY_HOME, else ~/.mimiclaw-relay)
  --force           overwrite identities the cluster already has (queued messages carried by an
                    earlier run are not written twice)
`;

function options(parsed: Parsed, env: NodeJS.ProcessEnv): MigrateOptions {
  if (parsed.positional.length > 0) throw new ArgsError(`unexpected argument ${parsed.positional[0]!}`);
  const redisUrl = parsed.strings.redis ?? (env.MIMICLAW_REDIS_URL || undefined);
  if (redisUrl === undefined) throw new ArgsError('missing --redis URL (the cluster\'s Redis, e.g. redis://127.0.0.1:6379)');
  const clusterName = parsed.strings.cluster ?? DEFAULTS.clusterName;
  try {
    checkRedisUrl(redisUrl);
    checkName('clusterName', clusterName);
  } catch (error) {
    if (!(error instanceof OptionsError)) throw error;
    const flag = error.option === 'redisUrl' ? '--redis' : '--cluster';
    throw new ArgsError(error.message.replace(/^\w+ must/, `${flag} must`));
  }
  return { redisUrl, clusterName, dataDir: parsed.dataDir, force: parsed.flags.force === true };
}

export async function runMigrate(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let migrate: MigrateOptions;
  try {
    const parsed = parse(argv, ['redis', 'cluster'], ['force']);
    if (parsed.help) {
      process.stdout.write(HELP);
      return 0;
    }
    migrate = options(parsed, env);
  } catch (error) {
    if (!(error instanceof ArgsError)) throw error;
    process.stderr.write(`mimiclaw-ws migrate: ${error.message}\n${MIGRATE_USAGE}\n`);
    return 2;
  }
  try {
    const result = await migrateDataDir(migrate);
    process.stdout.write(`${describeResult(result, migrate, printableUrl(migrate.redisUrl))}\n`);
    return 0;
  } catch (error) {
    const known = error instanceof MigrateError || error instanceof ClusterStartError;
    process.stderr.write(`mimiclaw-ws migrate: ${known ? '' : 'failed: '}${(error as Error).message ?? String(error)}\n`);
    return 1;
  }
}
