// Backup and restore of a data dir, safe while the relay runs.
//
// Every store file is append-only between rewrites, and rewrites (NeDB compaction, pruning)
// write a new file and rename it into place. So a file opened once and read to the end is a
// whole version of it, and cutting that copy after its last newline leaves only complete lines:
// a line being appended at that moment is left out, never torn. The files are copied one after
// the other, identities.db last, so every identity named in the other files is in the copy.
//
// The bundle is one file, readable with any tool:
//   {"format":"mimiclaw-ws-backup","version":1,"created_at":…,"relay_version":…}\n
//   then per file: {"file":NAME,"bytes":N,"mode":M}\n, N raw bytes, \n{"sha256":HEX}\n
//   and last {"end":true,"files":COUNT}\n
// restore checks the byte counts, the digests and the end line before it replaces anything.

import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';

export const BACKUP_FORMAT = 'mimiclaw-ws-backup';
export const LOCK_FILE = 'relay.lock';

export class BackupError extends Error {}

/** The data files a backup holds: the stores, not locks, temp files or .corrupt copies. */
export function isStoreFile(name: string): boolean {
  return name.endsWith('.db') && !name.startsWith('.');
}

/** Store files first, identities.db last (see above). */
function backupOrder(names: string[]): string[] {
  const stores = names.filter(isStoreFile).sort();
  return [...stores.filter((n) => n !== 'identities.db'), ...stores.filter((n) => n === 'identities.db')];
}

export interface BackupResult {
  out: string;
  files: { file: string; bytes: number }[];
}

async function writeAll(handle: fs.FileHandle, data: Buffer | string): Promise<void> {
  const buffer = typeof data === 'string' ? Buffer.from(data) : data;
  for (let at = 0; at < buffer.length; ) at += (await handle.write(buffer, at, buffer.length - at)).bytesWritten;
}

const CHUNK = 1024 * 1024;

/** Where the file's last complete line ends (just past its newline), looking back from `size`. */
async function lastLineEnd(source: fs.FileHandle, size: number): Promise<number> {
  const chunk = Buffer.alloc(64 * 1024);
  for (let end = size; end > 0; ) {
    const start = Math.max(0, end - chunk.length);
    const { bytesRead } = await source.read(chunk, 0, end - start, start);
    const at = chunk.subarray(0, bytesRead).lastIndexOf(0x0a);
    if (at >= 0) return start + at + 1;
    end = start;
  }
  return 0;
}

/**
 * Copies one open file up to its last complete line into the bundle. The copy is taken through
 * one descriptor: a rename by compaction meanwhile does not mix two versions, and appends
 * meanwhile land past the part copied.
 */
async function copyStore(source: fs.FileHandle, out: fs.FileHandle, name: string, mode: number): Promise<number> {
  const whole = await lastLineEnd(source, (await source.stat()).size);
  await writeAll(out, `${JSON.stringify({ file: name, bytes: whole, mode })}\n`);
  const digest = createHash('sha256');
  const buffer = Buffer.alloc(CHUNK);
  for (let at = 0; at < whole; ) {
    const { bytesRead } = await source.read(buffer, 0, Math.min(CHUNK, whole - at), at);
    if (bytesRead === 0) throw new BackupError(`${name} shrank while it was copied: run the backup again.`);
    const piece = buffer.subarray(0, bytesRead);
    digest.update(piece);
    await writeAll(out, piece);
    at += bytesRead;
  }
  await writeAll(out, `\n${JSON.stringify({ sha256: digest.digest('hex') })}\n`);
  return whole;
}

export async function backupDataDir(dataDir: string, out: string, relayVersion: string): Promise<BackupResult> {
  let names: string[];
  try {
    names = (await fs.readdir(dataDir, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);
  } catch (error) {
    throw new BackupError(`Cannot read data dir ${dataDir}: ${(error as Error).message}. Give the relay's --data-dir.`);
  }
  const order = backupOrder(names);
  if (order.length === 0) throw new BackupError(`No relay data in ${dataDir} (no *.db files): give the relay's --data-dir.`);
  const temp = `${out}.partial-${process.pid}`;
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(temp, 'w', 0o600);
  } catch (error) {
    throw new BackupError(`Cannot write the backup next to ${out}: ${(error as Error).message}. Give --out a path in a dir you can write.`);
  }
  const files: BackupResult['files'] = [];
  try {
    await writeAll(handle, `${JSON.stringify({ format: BACKUP_FORMAT, version: 1, created_at: Date.now(), relay_version: relayVersion, data_dir: path.resolve(dataDir) })}\n`);
    for (const name of order) {
      let source: fs.FileHandle;
      try {
        source = await fs.open(path.join(dataDir, name), 'r');
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw error;
      }
      try {
        const mode = (await source.stat()).mode & 0o777;
        files.push({ file: name, bytes: await copyStore(source, handle, name, mode) });
      } finally {
        await source.close();
      }
    }
    await writeAll(handle, `${JSON.stringify({ end: true, files: files.length })}\n`);
    await handle.sync();
    await handle.close();
    await fs.rename(temp, out);
  } catch (error) {
    await handle.close().catch(() => undefined);
    await fs.rm(temp, { force: true });
    throw error;
  }
  return { out, files };
}

/** Reads the bundle piece by piece: a header line, then exactly N bytes, and so on. */
class BundleReader {
  private buffer: Buffer = Buffer.alloc(0);
  private done = false;
  private readonly chunks: AsyncIterator<Buffer>;

  constructor(file: string) {
    this.chunks = (createReadStream(file, { highWaterMark: 1024 * 1024 }) as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  }

  private async more(): Promise<boolean> {
    if (this.done) return false;
    const next = await this.chunks.next();
    if (next.done) {
      this.done = true;
      return false;
    }
    this.buffer = this.buffer.length === 0 ? next.value : Buffer.concat([this.buffer, next.value]);
    return true;
  }

  async line(): Promise<Record<string, unknown> | null> {
    let end = this.buffer.indexOf(0x0a);
    while (end < 0) {
      if (this.buffer.length > 64 * 1024 || !(await this.more())) return null;
      end = this.buffer.indexOf(0x0a);
    }
    const text = this.buffer.toString('utf8', 0, end);
    this.buffer = this.buffer.subarray(end + 1);
    try {
      const value: unknown = JSON.parse(text);
      return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
    } catch {
      return null;
    }
  }

  /** Hands `bytes` bytes to `sink` as they come. False when the bundle ends first. */
  async bytes(count: number, sink: (chunk: Buffer) => Promise<void>): Promise<boolean> {
    let left = count;
    while (left > 0) {
      if (this.buffer.length === 0 && !(await this.more())) return false;
      const take = this.buffer.subarray(0, Math.min(left, this.buffer.length));
      this.buffer = this.buffer.subarray(take.length);
      left -= take.length;
      await sink(take);
    }
    return true;
  }

  close(): void {
    void this.chunks.return?.();
  }
}

/** Whether a live relay holds the data dir's lock file. */
export async function relayHolding(dataDir: string): Promise<number | null> {
  const pid = Number.parseInt(await fs.readFile(path.join(dataDir, LOCK_FILE), 'utf8').catch(() => ''), 10);
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return null;
  try {
    process.kill(pid, 0);
    return pid;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM' ? pid : null;
  }
}

export interface RestoreResult {
  dataDir: string;
  files: { file: string; bytes: number }[];
  createdAt: number | null;
}

const bad = (file: string, what: string) => new BackupError(`${file} is not a complete mimiclaw-ws backup (${what}); nothing was restored.`);

export async function restoreDataDir(bundle: string, dataDir: string, force: boolean): Promise<RestoreResult> {
  try {
    await fs.access(bundle);
  } catch {
    throw new BackupError(`Cannot read backup ${bundle}: give the file \`mimiclaw-ws backup\` wrote.`);
  }
  const holder = await relayHolding(dataDir);
  if (holder !== null) throw new BackupError(`A relay (pid ${holder}) is running on ${dataDir}: stop it before restoring into its data dir.`);
  await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });
  const existing = (await fs.readdir(dataDir)).filter((name) => !name.startsWith('.restore-'));
  if (existing.length > 0 && !force) {
    throw new BackupError(`${dataDir} is not empty (${existing.slice(0, 3).join(', ')}${existing.length > 3 ? ', …' : ''}): restore into an empty dir, or add --force to replace its store files.`);
  }
  const staging = path.join(dataDir, `.restore-${process.pid}`);
  await fs.rm(staging, { recursive: true, force: true });
  await fs.mkdir(staging, { mode: 0o700 });
  const reader = new BundleReader(bundle);
  const files: RestoreResult['files'] = [];
  let createdAt: number | null = null;
  try {
    const head = await reader.line();
    if (head?.format !== BACKUP_FORMAT || head.version !== 1) throw bad(bundle, 'no backup header');
    createdAt = typeof head.created_at === 'number' ? head.created_at : null;
    for (;;) {
      const entry = await reader.line();
      if (entry === null) throw bad(bundle, `it ends after ${files.length} files, without its end line`);
      if (entry.end === true) {
        if (entry.files !== files.length) throw bad(bundle, `the end line counts ${String(entry.files)} files, ${files.length} were read`);
        break;
      }
      const name = entry.file;
      const bytes = entry.bytes;
      if (typeof name !== 'string' || !isStoreFile(name) || path.basename(name) !== name || typeof bytes !== 'number' || !Number.isInteger(bytes) || bytes < 0) {
        throw bad(bundle, 'a damaged file header');
      }
      const mode = typeof entry.mode === 'number' && (entry.mode & 0o600) === 0o600 ? entry.mode & 0o777 : 0o600;
      const target = await fs.open(path.join(staging, name), 'w', mode);
      const digest = createHash('sha256');
      let complete: boolean;
      try {
        complete = await reader.bytes(bytes, async (chunk) => {
          digest.update(chunk);
          await writeAll(target, chunk);
        });
        await target.sync();
      } finally {
        await target.close();
      }
      await fs.chmod(path.join(staging, name), mode).catch(() => undefined);
      const newline = complete ? await reader.bytes(1, async () => undefined) : false;
      const trailer = newline ? await reader.line() : null;
      if (!complete || trailer === null) throw bad(bundle, `${name} is cut short`);
      if (trailer.sha256 !== digest.digest('hex')) throw bad(bundle, `${name} does not match its SHA-256`);
      files.push({ file: name, bytes });
    }
    // Checked whole: now replace. Store files the backup does not hold are removed, so the dir is the backup's.
    for (const name of await fs.readdir(dataDir)) {
      if (isStoreFile(name) && !files.some((f) => f.file === name)) await fs.rm(path.join(dataDir, name), { force: true });
    }
    for (const { file } of files) await fs.rename(path.join(staging, file), path.join(dataDir, file));
  } finally {
    reader.close();
    await fs.rm(staging, { recursive: true, force: true });
  }
  return { dataDir, files, createdAt };
}
