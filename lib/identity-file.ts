// The identity a client keeps between runs: a small JSON file {id, key, role}. The key is a
// credential, so the file is written owner-only (0600) and replaced atomically.

import fs from 'node:fs/promises';
import path from 'node:path';
import { isPlainObject, type Role } from './protocol';

export interface StoredIdentity {
  id: string;
  key: string;
  role: Role;
}

export class IdentityFileError extends Error {}

/** The identity in `file`, or undefined when the file does not exist. */
export async function readIdentityFile(file: string): Promise<StoredIdentity | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new IdentityFileError(`Cannot read identity file ${file}: ${(error as Error).message}.`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (
    !isPlainObject(parsed) ||
    typeof parsed.id !== 'string' ||
    parsed.id === '' ||
    typeof parsed.key !== 'string' ||
    parsed.key === '' ||
    (parsed.role !== 'boss' && parsed.role !== 'employee')
  ) {
    throw new IdentityFileError(
      `Identity file ${file} is not {"id","key","role"} JSON: fix it, or remove it to register a new identity.`,
    );
  }
  return { id: parsed.id, key: parsed.key, role: parsed.role };
}

/** Writes the identity owner-only; a reader never sees a half-written file. */
export async function writeIdentityFile(file: string, identity: StoredIdentity): Promise<void> {
  await fs.mkdir(path.dirname(path.resolve(file)), { recursive: true, mode: 0o700 });
  const temp = `${file}.${process.pid}.${Date.now()}.tmp`;
  const text = JSON.stringify({ id: identity.id, key: identity.key, role: identity.role }, null, 2) + '\n';
  try {
    await fs.writeFile(temp, text, { mode: 0o600, flag: 'wx' });
    await fs.chmod(temp, 0o600);
    await fs.rename(temp, file);
  } catch (error) {
    await fs.rm(temp, { force: true });
    throw error;
  }
}
