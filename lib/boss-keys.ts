// --boss-keys-file: named boss credentials, so each boss (or team of bosses) has its own key
// that can be revoked alone, and the log can say which one a boss used. One credential a line,
// `name:key` or `name:sha256:<64 hex digits>` (the SHA-256 of the key, so the file need not hold
// it); lines starting with # and blank lines are skipped. The relay reads the file at start and
// again on reload() (SIGHUP): a file that cannot be read or parsed keeps the keys in use.

import { createHash, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs/promises';
import type { Logger } from './logger';

/** The credential name the log and the dashboard give a boss that used --authkey. */
export const AUTHKEY_CREDENTIAL = 'authkey';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;
const HASHED = /^sha256:([0-9a-fA-F]{64})$/;
/** Permission bits for users other than the owner and its group. */
const OTHERS_READ_WRITE = 0o006;

export interface BossKey {
  name: string;
  /** SHA-256 of the key. */
  hash: Buffer;
  line: number;
}

export class BossKeysError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BossKeysError';
  }
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** The credentials in a boss keys file's text; any bad line refuses the whole file, naming the line. */
export function parseBossKeys(text: string, file: string): BossKey[] {
  const keys: BossKey[] = [];
  const byName = new Map<string, BossKey>();
  const byHash = new Map<string, BossKey>();
  const problem = (line: number, what: string) => new BossKeysError(`Boss keys file ${file} line ${line}: ${what}`);
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = index + 1;
    const trimmed = raw.trim();
    if (trimmed === '' || trimmed.startsWith('#')) return;
    const colon = trimmed.indexOf(':');
    if (colon < 0) throw problem(line, 'expected name:key or name:sha256:<hex>.');
    const name = trimmed.slice(0, colon).trim();
    const secret = trimmed.slice(colon + 1).trim();
    if (!NAME.test(name)) {
      throw problem(line, `the name "${name.slice(0, 40)}" must be 1 to 64 letters, digits, ".", "_", "@" or "-", starting with a letter or digit.`);
    }
    if (name === AUTHKEY_CREDENTIAL) throw problem(line, `the name "${AUTHKEY_CREDENTIAL}" is kept for the --authkey credential: pick another.`);
    if (secret === '') throw problem(line, `credential "${name}" has no key.`);
    if (secret.startsWith('sha256:') && !HASHED.test(secret)) {
      throw problem(line, `credential "${name}" gives a hash that is not 64 hex digits: write sha256: and the key's SHA-256 in hex (e.g. printf %s KEY | sha256sum).`);
    }
    const hashed = HASHED.exec(secret);
    const key: BossKey = { name, hash: hashed ? Buffer.from(hashed[1]!, 'hex') : sha256(secret), line };
    const sameName = byName.get(name);
    if (sameName) throw problem(line, `the name "${name}" is already used on line ${sameName.line}: each credential needs its own name.`);
    const sameKey = byHash.get(key.hash.toString('hex'));
    if (sameKey) {
      throw problem(line, `credential "${name}" has the same key as "${sameKey.name}" on line ${sameKey.line}: give each credential its own key, or the log cannot tell them apart.`);
    }
    byName.set(name, key);
    byHash.set(key.hash.toString('hex'), key);
    keys.push(key);
  });
  return keys;
}

export type BossKeysReloadResult =
  | { added: string[]; removed: string[]; changed: string[]; error: null }
  | { added: []; removed: []; changed: []; error: string };

/** Names that are gone from the file, or whose key changed: sessions that used them are closed. */
export type RevokedListener = (revoked: ReadonlySet<string>) => void;

export class BossKeys {
  private readonly listeners = new Set<RevokedListener>();

  private constructor(
    readonly file: string,
    private keys: BossKey[],
    private readonly logger: Logger,
  ) {}

  static async load(file: string, logger: Logger): Promise<BossKeys> {
    const keys = await BossKeys.read(file, logger);
    logger.info('boss_keys_loaded', { file, names: keys.map((key) => key.name) });
    return new BossKeys(file, keys, logger);
  }

  private static async read(file: string, logger: Logger): Promise<BossKey[]> {
    let text: string;
    try {
      text = await fs.readFile(file, 'utf8');
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code ?? 'error';
      throw new BossKeysError(`Cannot read the boss keys file ${file} (${code}): check the path and that the relay's user may read it.`);
    }
    const keys = parseBossKeys(text, file);
    if (process.platform !== 'win32') {
      const mode = (await fs.stat(file)).mode;
      if ((mode & OTHERS_READ_WRITE) !== 0) {
        logger.warn('secret_file_exposed', {
          file,
          what: 'boss keys',
          mode: `0${(mode & 0o777).toString(8)}`,
          message: `boss keys file ${file} can be read or written by other users: chmod 600 it (or 640 owned by the relay's group).`,
        });
      }
    }
    return keys;
  }

  get names(): string[] {
    return this.keys.map((key) => key.name);
  }

  /**
   * The name of the credential `given` is the key of, or null. Every credential is compared, in
   * constant time, so the time taken tells neither which one matched nor how many there are
   * before it.
   */
  match(given: string): string | null {
    const digest = sha256(given);
    let found: string | null = null;
    for (const key of this.keys) {
      if (timingSafeEqual(digest, key.hash) && found === null) found = key.name;
    }
    return found;
  }

  onRevoked(listener: RevokedListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Reads the file again; new keys apply to auths from now on, revoked ones end their sessions. */
  async reload(): Promise<BossKeysReloadResult> {
    let keys: BossKey[];
    try {
      keys = await BossKeys.read(this.file, this.logger);
    } catch (error) {
      const message = (error as Error).message;
      this.logger.error('boss_keys_reload_failed', { file: this.file, error: message, kept: 'the keys in use' });
      return { added: [], removed: [], changed: [], error: message };
    }
    const before = new Map(this.keys.map((key) => [key.name, key.hash]));
    const after = new Map(keys.map((key) => [key.name, key.hash]));
    const added = [...after.keys()].filter((name) => !before.has(name));
    const removed = [...before.keys()].filter((name) => !after.has(name));
    const changed = [...after].filter(([name, hash]) => before.has(name) && !before.get(name)!.equals(hash)).map(([name]) => name);
    this.keys = keys;
    this.logger.info('boss_keys_reloaded', { file: this.file, added, removed, changed });
    const revoked = new Set([...removed, ...changed]);
    if (revoked.size > 0) for (const listener of this.listeners) listener(revoked);
    return { added, removed, changed, error: null };
  }
}
