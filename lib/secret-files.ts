// Keys kept in files (--authkey-file, --employee-key-file, --tls-key): read asynchronously, a
// trailing newline dropped, an empty file refused, and a file that other users can read or write
// named in a warning. The relay reads them at start and again on reload (SIGHUP).

import fs from 'node:fs/promises';
import type { Logger } from './logger';

export class SecretFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SecretFileError';
  }
}

/** Permission bits for "other users" (neither the owner nor the group): read or write. */
const OTHERS_READ_WRITE = 0o006;

/** Warns (once per read) when users other than the owner and its group can read or write `file`. */
export async function warnIfExposed(file: string, what: string, logger: Logger): Promise<void> {
  if (process.platform === 'win32') return;
  const stat = await fs.stat(file);
  if ((stat.mode & OTHERS_READ_WRITE) === 0) return;
  logger.warn('secret_file_exposed', {
    file,
    what,
    mode: `0${(stat.mode & 0o777).toString(8)}`,
    message: `${what} file ${file} can be read or written by other users: chmod 600 it (or 640 owned by the relay's group).`,
  });
}

/** The secret held in `file`: its text less one trailing newline. `what` names it in messages ("authkey"). */
export async function readSecretFile(file: string, what: string, logger: Logger): Promise<string> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'error';
    throw new SecretFileError(`Cannot read the ${what} file ${file} (${code}): check the path and that the relay's user may read it.`);
  }
  const secret = text.replace(/\r?\n$/, '');
  if (secret === '' || /[\r\n]/.test(secret)) {
    throw new SecretFileError(`The ${what} file ${file} must hold the key on one line (it is ${secret === '' ? 'empty' : 'several lines'}).`);
  }
  await warnIfExposed(file, what, logger);
  return secret;
}

/** The settings whose keys may come from files; the keys read are written into them. */
export interface KeyFileSettings {
  authkey: string;
  authkeyFile: string | undefined;
  employeeKey: string | undefined;
  employeeKeyFile: string | undefined;
}

/**
 * Reads the key files named in `settings` into it and returns which keys changed. The router and
 * the admin API read the keys from the same settings at each auth, so a changed key is asked of
 * every auth from then on; connections already authenticated stay.
 */
export async function loadKeyFiles(settings: KeyFileSettings, logger: Logger): Promise<string[]> {
  const [authkey, employeeKey] = await Promise.all([
    settings.authkeyFile === undefined ? undefined : readSecretFile(settings.authkeyFile, 'authkey', logger),
    settings.employeeKeyFile === undefined ? undefined : readSecretFile(settings.employeeKeyFile, 'employee key', logger),
  ]);
  const changed: string[] = [];
  if (authkey !== undefined && authkey !== settings.authkey) {
    settings.authkey = authkey;
    changed.push('authkey');
  }
  if (employeeKey !== undefined && employeeKey !== settings.employeeKey) {
    settings.employeeKey = employeeKey;
    changed.push('employee_key');
  }
  return changed;
}

export type KeyReloadResult = { changed: string[]; error: null } | { changed: []; error: string };

/** loadKeyFiles for a running relay: a file that cannot be read is logged and every key in use is kept. */
export async function reloadKeyFiles(settings: KeyFileSettings, logger: Logger): Promise<KeyReloadResult> {
  if (settings.authkeyFile === undefined && settings.employeeKeyFile === undefined) return { changed: [], error: null };
  try {
    const changed = await loadKeyFiles(settings, logger);
    logger.info('key_files_reloaded', { changed });
    return { changed, error: null };
  } catch (error) {
    const message = (error as Error).message;
    logger.error('key_files_reload_failed', { error: message, kept: 'the keys in use' });
    return { changed: [], error: message };
  }
}
