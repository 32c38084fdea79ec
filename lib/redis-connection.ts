// Connecting to the cluster store. ioredis retries forever by default, which would make a
// wrong --redis hang the start: the first connect is bounded and a failure is one clear error;
// once the node runs, a lost connection is retried (at most a second apart) and commands fail
// at once instead of queueing, so whatever needs Redis answers cluster_unavailable meanwhile.

import Redis from 'ioredis';

export const FIRST_CONNECT_TIMEOUT_MS = 5000;

export class ClusterStartError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ClusterStartError';
  }
}

/** The URL as it may be printed: without its password. */
export function printableUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== '') parsed.password = '***';
    return parsed.toString();
  } catch {
    return 'the given URL';
  }
}

export async function connectRedis(url: string, role: string): Promise<Redis> {
  let started = false;
  const client = new Redis(url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: FIRST_CONNECT_TIMEOUT_MS,
    connectionName: role,
    retryStrategy: (attempt) => (started ? Math.min(attempt * 100, 1000) : null),
  });
  // Errors are reported through the commands that fail and the node's availability; without a
  // listener ioredis would print each reconnect attempt.
  let lastError: Error | null = null;
  client.on('error', (error: Error) => (lastError = error));
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      client.connect(),
      new Promise((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${FIRST_CONNECT_TIMEOUT_MS / 1000} s`)), FIRST_CONNECT_TIMEOUT_MS);
      }),
    ]);
  } catch (error) {
    client.disconnect();
    throw new ClusterStartError(
      `Cannot reach Redis at ${printableUrl(url)} (${(lastError ?? (error as Error)).message}): start Redis there or fix --redis / MIMICLAW_REDIS_URL.`,
    );
  } finally {
    clearTimeout(timer);
  }
  started = true;
  return client;
}

/** Ends a connection: politely when it is up (QUIT waits for replies), at once otherwise. */
export async function closeRedis(client: Redis): Promise<void> {
  try {
    if (client.status === 'ready') await client.quit();
    else client.disconnect();
  } catch {
    client.disconnect();
  }
}
