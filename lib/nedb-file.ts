// Opening a NeDB datafile the way every relay store needs it: a damaged line (power loss) never
// stops the start. NeDB refuses to load past a corruption threshold and does not say how much
// it skipped below it, so load strictly first, and on corruption keep a copy of the damaged
// file, log the count and load again tolerating it. Files get `fileMode` (0600 by default):
// NeDB uses it for the files it writes (compaction writes a new file and renames it), and the
// datafile is set to it at open, tightening files an older relay wrote 0644.

import fs from 'node:fs/promises';
import Datastore from '@seald-io/nedb';
import { applyFileMode, DEFAULT_FILE_MODE, dirModeFor } from './data-dir';
import type { Logger } from './logger';

interface CorruptionError extends Error {
  corruptItems?: number;
  dataLength?: number;
}

export async function openDatastore<T extends Record<string, unknown>>(
  filename: string,
  logger: Logger,
  compactionIntervalMs: number,
  fileMode = DEFAULT_FILE_MODE,
): Promise<Datastore<T>> {
  const modes = { fileMode, dirMode: dirModeFor(fileMode) };
  const strict = new Datastore<T>({ filename, corruptAlertThreshold: 0, modes });
  try {
    await strict.loadDatabaseAsync();
    await applyFileMode(filename, fileMode, logger);
    strict.setAutocompactionInterval(compactionIntervalMs);
    return strict;
  } catch (error) {
    const corrupt = error as CorruptionError;
    if (typeof corrupt.corruptItems !== 'number') throw error;
    const backup = `${filename}.corrupt-${Date.now()}`;
    await fs.copyFile(filename, backup);
    await applyFileMode(backup, fileMode, logger);
    logger.warn('store_lines_skipped', {
      file: filename,
      skipped_lines: corrupt.corruptItems,
      total_lines: corrupt.dataLength ?? null,
      backup,
    });
  }
  const tolerant = new Datastore<T>({ filename, corruptAlertThreshold: 1, modes });
  await tolerant.loadDatabaseAsync();
  await applyFileMode(filename, fileMode, logger);
  tolerant.setAutocompactionInterval(compactionIntervalMs);
  return tolerant;
}
