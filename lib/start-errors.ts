// A data dir the relay cannot use, told the way an operator can act on it: which path, what is
// wrong with it, what to do. startRelay() throws DataDirError; the command prints its message.

import fs from 'node:fs/promises';
import path from 'node:path';

export class DataDirError extends Error {
  constructor(
    message: string,
    /** The errno code behind it (EACCES, ENOTDIR…), when there is one. */
    readonly code: string | undefined,
    /** The file or directory that failed. */
    readonly path: string,
  ) {
    super(message);
    this.name = 'DataDirError';
  }
}

const PICK_ANOTHER = 'or pick another data dir (--data-dir, or MIMICLAW_RELAY_HOME)';

/** The nearest existing ancestor of `target` (itself included), or undefined. */
async function nearestExisting(target: string): Promise<{ path: string; isDirectory: boolean } | undefined> {
  for (let current = target; ; current = path.dirname(current)) {
    const stat = await fs.stat(current).catch(() => undefined);
    if (stat) return { path: current, isDirectory: stat.isDirectory() };
    if (path.dirname(current) === current) return undefined;
  }
}

/** Turns an error from opening the stores into a DataDirError; anything else is returned as is. */
export async function dataDirError(dataDir: string, error: unknown): Promise<unknown> {
  const errno = error as NodeJS.ErrnoException;
  if (!(error instanceof Error) || typeof errno.code !== 'string') return error;
  const failed = typeof errno.path === 'string' ? errno.path : dataDir;
  const make = (message: string, at = failed) => new DataDirError(message, errno.code, at);
  const errorFor = (file: string) =>
    make(`Cannot open the data dir's file ${file}: it is a directory. Move it away (the relay recreates its files), ${PICK_ANOTHER}.`, file);
  switch (errno.code) {
    case 'EACCES':
    case 'EPERM':
      return make(`Cannot write the data dir: permission denied on ${failed}. Give the user running the relay write access to ${dataDir} and its files (e.g. chown -R that user), ${PICK_ANOTHER}.`);
    case 'EROFS':
      return make(`Cannot write the data dir: ${failed} is on a read-only file system. ${PICK_ANOTHER[0]!.toUpperCase()}${PICK_ANOTHER.slice(1)} on a writable one.`);
    case 'EEXIST':
    case 'ENOTDIR': {
      const blocker = await nearestExisting(failed);
      const file = blocker && !blocker.isDirectory ? blocker.path : failed;
      return make(`Cannot use the data dir ${dataDir}: ${file} is a file, not a directory. Move that file away, ${PICK_ANOTHER}.`);
    }
    case 'EISDIR': {
      // A read of a directory opened as a file says neither which file nor where.
      const entries = errno.path === undefined ? await fs.readdir(dataDir, { withFileTypes: true }).catch(() => []) : [];
      const directory = entries.find((entry) => entry.isDirectory() && entry.name.endsWith('.db'));
      if (directory) return errorFor(path.join(dataDir, directory.name));
      return errorFor(failed);
    }
    case 'ENOSPC':
    case 'EDQUOT':
      return make(`Cannot write the data dir: no space left for ${failed}. Free some space on that disk, ${PICK_ANOTHER}.`);
    case 'EMFILE':
    case 'ENFILE':
      return make(`Cannot open ${failed}: too many open files. Raise the limit (ulimit -n) and start again.`);
    default:
      return make(`Cannot use the data dir ${dataDir}: ${errno.message}. Check ${failed}, ${PICK_ANOTHER}.`);
  }
}

/** Fails with EISDIR (and the path) when `file` exists as a directory. */
export async function assertNotDirectory(file: string): Promise<void> {
  const stat = await fs.stat(file).catch(() => undefined);
  if (stat?.isDirectory()) {
    throw Object.assign(new Error(`EISDIR: illegal operation on a directory, open '${file}'`), { code: 'EISDIR', path: file, syscall: 'open' });
  }
}
