// relay.lock in the data dir: two relays writing the same NeDB files would corrupt them, so the
// second one is refused. The file holds the owner's pid; a lock left by a process that is gone
// (kill -9, power loss) is taken over.

import fs from 'node:fs/promises';
import path from 'node:path';

export class DataDirLockedError extends Error {
  constructor(dataDir: string, pid: number) {
    super(`Data dir ${dataDir} is in use by another relay (pid ${pid}): stop it, or give this one its own --data-dir.`);
    this.name = 'DataDirLockedError';
  }
}

function alive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface DataDirLock {
  release(): Promise<void>;
}

/** Relays of one process share nothing either: each lock is held by one startRelay. */
const heldHere = new Set<string>();

export async function lockDataDir(dataDir: string, fileMode: number): Promise<DataDirLock> {
  const file = path.join(dataDir, 'relay.lock');
  if (heldHere.has(file)) throw new DataDirLockedError(dataDir, process.pid);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      await fs.writeFile(file, `${process.pid}\n`, { flag: 'wx', mode: fileMode });
      heldHere.add(file);
      return {
        release: async () => {
          heldHere.delete(file);
          await fs.rm(file, { force: true });
        },
      };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
    const pid = Number.parseInt(await fs.readFile(file, 'utf8').catch(() => ''), 10);
    if (Number.isInteger(pid) && pid > 0 && alive(pid) && pid !== process.pid) throw new DataDirLockedError(dataDir, pid);
    // Left by a process that is gone (or by this process's relay that was not closed): take it over.
    await fs.rm(file, { force: true });
  }
  throw new DataDirLockedError(dataDir, process.pid);
}
