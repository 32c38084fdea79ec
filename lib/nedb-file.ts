// Opening a NeDB datafile the way every relay store needs it: a damaged line (power loss) never
// stops the start. NeDB refuses to load past a corruption threshold and does not say how much
// it skipped below it, so load strictly first, and on corruption keep a copy of the damaged
// file, log the count and load again tolerating it.

import fs from 'node:fs/promises';
import Datastore from '@seald-io/nedb';
import type { Logger } from './logger';

interface CorruptionError extends Error {
  corruptItems?: number;
  dataLength?: number;
}

export async function openDatastore<T extends Record<string, unknown>>(
  filename: string,
  logger: Logger,
  compactionIntervalMs: number,
): Promise<Datastore<T>> {
  const strict = new Datastore<T>({ filename, corruptAlertThreshold: 0 });
  try {
    await strict.loadDatabaseAsync();
    strict.setAutocompactionInterval(compactionIntervalMs);
    return strict;
  } catch (error) {
    const corrupt = error as CorruptionError;
    if (typeof corrupt.corruptItems !== 'number') throw error;
    const backup = `${filename}.corrupt-${Date.now()}`;
    await fs.copyFile(filename, backup);
    logger.warn('store_lines_skipped', {
      file: filename,
      skipped_lines: corrupt.corruptItems,
      total_lines: corrupt.dataLength ?? null,
      backup,
    });
  }
  const tolerant = new Datastore<T>({ filename, corruptAlertThreshold: 1 });
  await tolerant.loadDatabaseAsync();
  tolerant.setAutocompactionInterval(compactionIntervalMs);
  return tolerant;
}
