// What the cluster test files share: one redis-server for the file, and the processes, relays and
// extra redis-servers a test started that its own cleanup may miss (a start that threw half-way),
// ended after each test so a failing test still lets the run end.

import { after, afterEach, before } from 'node:test';
import type { RelayProcess } from './fault-support';
import { startRedis, type TestRedis } from './redis-harness';
import type { TestRelay } from './support';

export interface Leftovers {
  children: RelayProcess[];
  relays: TestRelay[];
  redises: TestRedis[];
}

/** Registers the file's hooks; `started` receives the file's redis-server before the first test. */
export function useClusterFixture(started: (redis: TestRedis) => void): Leftovers {
  let redis: TestRedis | null = null;
  const leftovers: Leftovers = { children: [], relays: [], redises: [] };

  before(async () => {
    redis = await startRedis();
    started(redis);
  });

  after(async () => {
    await redis?.stop();
  });

  afterEach(async () => {
    for (const child of leftovers.children.splice(0)) {
      child.child.child.kill('SIGKILL');
      await child.child.exited.catch(() => undefined);
    }
    for (const relay of leftovers.relays.splice(0)) await relay.dispose().catch(() => undefined);
    for (const server of leftovers.redises.splice(0)) await server.stop().catch(() => undefined);
  });

  return leftovers;
}
