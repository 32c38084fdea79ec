// Who may read the data dir. It holds every identity's key hash and every message payload, so
// it is private by default: the relay's files are 0600 and a dir it creates 0700. --file-mode
// changes both (a dir gets a search bit for each class that may read the files). A dir that
// already exists keeps its mode, which is the operator's to choose (it may be a shared mount):
// the relay warns when others can enter it.

import fs from 'node:fs/promises';
import type { Logger } from './logger';

export const DEFAULT_FILE_MODE = 0o600;

/** The mode of a dir whose files have `fileMode`: whoever may read the files may enter it. */
export function dirModeFor(fileMode: number): number {
  return fileMode | ((fileMode & 0o444) >> 2);
}

/** Creates the data dir with the private mode, or warns when an existing one is more open. */
export async function prepareDataDir(dir: string, fileMode: number, logger: Logger): Promise<void> {
  const dirMode = dirModeFor(fileMode);
  await fs.mkdir(dir, { recursive: true, mode: dirMode });
  if (process.platform === 'win32') return;
  const mode = (await fs.stat(dir)).mode & 0o777;
  if ((mode & ~dirMode & 0o077) !== 0) {
    logger.warn('data_dir_permissions', {
      dir,
      mode: mode.toString(8),
      expected: dirMode.toString(8),
      advice: `Other users can enter the data dir; its files are kept ${fileMode.toString(8)}, but the dir's mode is left to you: chmod ${dirMode.toString(8)} ${dir}`,
    });
  }
}

/**
 * Sets a file the relay owns to `fileMode` (also tightening one an older relay wrote 0644). A
 * file system that cannot change modes (some network mounts) is logged, not fatal.
 */
export async function applyFileMode(file: string, fileMode: number, logger: Logger): Promise<void> {
  try {
    await fs.chmod(file, fileMode);
  } catch (error) {
    logger.warn('file_mode_not_set', { file, mode: fileMode.toString(8), error: (error as Error).message });
  }
}
