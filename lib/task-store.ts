// tasks.db: the dispatch queue on disk (PROTOCOL.md part C). A task sent to `any:<tag>` is kept
// here from before its ack until it is answered, failed or expired, so waiting and in-progress
// tasks survive a restart or a crash. Each task is one document written once; each assignment
// adds a small marker document, so a task's attempts are known after a restart without ever
// rewriting the task. Writes are batched per tick, one append each.
//
// The dispatcher sees only the TaskStore interface, so the same scheduler can later keep its
// state somewhere shared by several nodes.

import fs from 'node:fs/promises';
import type { Logger } from './logger';
import { DEFAULT_FILE_MODE } from './data-dir';
import { openDatastore } from './nedb-file';
import type { Priority, Role } from './protocol';

/** A task as stored: everything needed to dispatch it again after a restart. */
export interface StoredTask {
  _id: string;
  /** Global submission order. */
  seq: number;
  msg_id: string;
  from_id: string;
  from_role: Role;
  /** The tag of its `any:<tag>` target ("*" for any employee). */
  tag: string;
  priority: Priority;
  /** The forwarded frame up to the target id, and from after `"attempt":n` to the end. */
  head: string;
  rest: string;
  /** Lease of one attempt, ms. */
  timeout_ms: number;
  created_at: number;
  /** When a task still waiting gives up, ms since epoch. */
  expires_at: number;
}

/** A stored task with the attempts already made (assignments written before the restart). */
export interface LoadedTask {
  task: StoredTask;
  attempts: number;
}

export interface TaskStore {
  /** Every task on disk, in submission order. */
  load(): LoadedTask[];
  /** Next submission number (continues after a restart). */
  nextSeq(): number;
  /** Resolves once the task, and its first assignment when given, are on disk. */
  add(task: StoredTask, firstAssignee: string | null): Promise<void>;
  /** Notes an assignment; written in the next batch, nothing waits for it. */
  assigned(taskId: string, employeeId: string, attempt: number): void;
  /** Forgets a finished task and its assignment markers. */
  remove(taskId: string, attempts: number): void;
  flush(): Promise<void>;
  close(): Promise<void>;
  readonly size: number;
}

interface PendingInsert {
  lines: string;
  resolve: () => void;
  reject: (error: Error) => void;
}

const ASSIGNMENT = '@';
/** Rewrite the file once it holds this many lines more than the live documents. */
const COMPACT_AFTER_DEAD_LINES = 20_000;

function readTask(doc: Record<string, unknown>): StoredTask | null {
  const text = (key: string) => (typeof doc[key] === 'string' ? (doc[key] as string) : null);
  const num = (key: string) => (typeof doc[key] === 'number' && Number.isFinite(doc[key]) ? (doc[key] as number) : null);
  const [id, msgId, fromId, fromRole, tag, priority, head, rest] = ['_id', 'msg_id', 'from_id', 'from_role', 'tag', 'priority', 'head', 'rest'].map(text);
  const [seq, timeoutMs, createdAt, expiresAt] = ['seq', 'timeout_ms', 'created_at', 'expires_at'].map(num);
  if (!id || !msgId || !fromId || !tag || head === null || rest === null) return null;
  if (fromRole !== 'boss' && fromRole !== 'employee') return null;
  if (priority !== 'high' && priority !== 'normal' && priority !== 'low') return null;
  if (seq === null || timeoutMs === null || createdAt === null || expiresAt === null) return null;
  return { _id: id, seq, msg_id: msgId, from_id: fromId, from_role: fromRole, tag, priority, head, rest, timeout_ms: timeoutMs, created_at: createdAt, expires_at: expiresAt };
}

/**
 * tasks.db in NeDB's datafile format (one JSON document per line, a later
 * `{"$$deleted":true,"_id"}` line removing one), loaded with NeDB at start (so a damaged line is
 * skipped like in every other store) and then appended to through one open file handle: a tick's
 * new tasks, assignments and removals are one write. The file is rewritten with only the live
 * documents at start and whenever dead lines pile up.
 */
export class NedbTaskStore implements TaskStore {
  private readonly loaded: LoadedTask[];
  private seq: number;
  private count: number;
  /** Live documents as written, for rewriting the file. */
  private readonly live = new Map<string, string>();
  private deadLines = 0;
  private inserts: PendingInsert[] = [];
  private loose = '';
  private scheduled = false;
  private writing: Promise<void> = Promise.resolve();
  private handle: fs.FileHandle | null = null;

  private constructor(
    docs: Record<string, unknown>[],
    private readonly filename: string,
    private readonly logger: Logger,
    private readonly fsync: boolean,
    private readonly fileMode: number,
  ) {
    const tasks = new Map<string, LoadedTask>();
    const attempts = new Map<string, { attempt: number; employee: string }>();
    for (const doc of docs) {
      const id = typeof doc._id === 'string' ? doc._id : '';
      const at = id.indexOf(ASSIGNMENT);
      if (at > 0) {
        const taskId = id.slice(0, at);
        const attempt = typeof doc.attempt === 'number' ? doc.attempt : 0;
        if (attempt > (attempts.get(taskId)?.attempt ?? 0)) attempts.set(taskId, { attempt, employee: String(doc.employee_id) });
        continue;
      }
      const task = readTask(doc);
      if (task) tasks.set(task._id, { task, attempts: 0 });
      else logger.warn('task_skipped', { reason: 'unreadable document' });
    }
    for (const [taskId, { attempt, employee }] of attempts) {
      const entry = tasks.get(taskId);
      if (!entry) continue; // a marker whose task is gone: dropped by the rewrite at open
      entry.attempts = attempt;
      // Only the latest marker matters after a restart; markers 1..n are removed with the task.
      this.live.set(`${taskId}${ASSIGNMENT}${attempt}`, assignmentLine(taskId, employee, attempt));
    }
    this.loaded = [...tasks.values()].sort((a, b) => a.task.seq - b.task.seq);
    for (const { task } of this.loaded) this.live.set(task._id, JSON.stringify(task) + '\n');
    this.seq = this.loaded.length > 0 ? this.loaded[this.loaded.length - 1]!.task.seq + 1 : 1;
    this.count = this.loaded.length;
  }

  static async open(filename: string, logger: Logger, options: { compactionIntervalMs: number; fsync: boolean; fileMode?: number }): Promise<NedbTaskStore> {
    const fileMode = options.fileMode ?? DEFAULT_FILE_MODE;
    const db = await openDatastore<Record<string, unknown>>(filename, logger, options.compactionIntervalMs, fileMode);
    db.stopAutocompaction();
    const store = new NedbTaskStore(db.getAllData(), filename, logger, options.fsync, fileMode);
    await store.rewrite();
    return store;
  }

  get size(): number {
    return this.count;
  }

  load(): LoadedTask[] {
    return this.loaded;
  }

  nextSeq(): number {
    return this.seq++;
  }

  add(task: StoredTask, firstAssignee: string | null): Promise<void> {
    this.count++;
    let lines = JSON.stringify(task) + '\n';
    this.live.set(task._id, lines);
    if (firstAssignee !== null) {
      const marker = assignmentLine(task._id, firstAssignee, 1);
      this.live.set(`${task._id}${ASSIGNMENT}1`, marker);
      lines += marker;
    }
    return new Promise((resolve, reject) => {
      this.inserts.push({ lines, resolve, reject });
      this.schedule();
    });
  }

  assigned(taskId: string, employeeId: string, attempt: number): void {
    const marker = assignmentLine(taskId, employeeId, attempt);
    this.live.set(`${taskId}${ASSIGNMENT}${attempt}`, marker);
    this.loose += marker;
    this.schedule();
  }

  remove(taskId: string, attempts: number): void {
    if (!this.live.has(taskId)) return;
    this.count--;
    this.loose += deletedLine(taskId);
    this.live.delete(taskId);
    this.deadLines += 2;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      const id = `${taskId}${ASSIGNMENT}${attempt}`;
      if (!this.live.delete(id)) continue;
      this.loose += deletedLine(id);
      this.deadLines += 2;
    }
    this.schedule();
  }

  flush(): Promise<void> {
    this.writing = this.writing.then(() => this.writeBatch());
    return this.writing;
  }

  async close(): Promise<void> {
    await this.flush();
    await this.handle?.close();
    this.handle = null;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  private async writeBatch(): Promise<void> {
    const inserts = this.inserts;
    // New tasks first, then assignments and removals, which may name them.
    const text = inserts.map((insert) => insert.lines).join('') + this.loose;
    this.inserts = [];
    this.loose = '';
    if (text === '') return;
    try {
      this.handle ??= await fs.open(this.filename, 'a', this.fileMode);
      await this.handle.write(text);
      if (this.fsync) await this.handle.sync();
      for (const insert of inserts) insert.resolve();
    } catch (error) {
      this.logger.error('task_write_failed', { tasks: inserts.length, error: (error as Error).message });
      for (const insert of inserts) insert.reject(error as Error);
    }
    if (this.deadLines > COMPACT_AFTER_DEAD_LINES && this.deadLines > this.live.size) {
      await this.rewrite().catch((error: Error) => this.logger.error('task_compaction_failed', { error: error.message }));
    }
  }

  /** Replaces the file with the live documents (written aside, then renamed over it). */
  private async rewrite(): Promise<void> {
    await this.handle?.close();
    this.handle = null;
    const temp = `${this.filename}~`;
    await fs.writeFile(temp, [...this.live.values()].join(''), { mode: this.fileMode });
    await fs.chmod(temp, this.fileMode);
    if (this.fsync) {
      const handle = await fs.open(temp, 'r+');
      await handle.sync().finally(() => handle.close());
    }
    await fs.rename(temp, this.filename);
    this.deadLines = 0;
  }
}

function assignmentLine(taskId: string, employeeId: string, attempt: number): string {
  return `{"_id":${JSON.stringify(`${taskId}${ASSIGNMENT}${attempt}`)},"employee_id":${JSON.stringify(employeeId)},"attempt":${attempt}}\n`;
}

function deletedLine(id: string): string {
  return `{"$$deleted":true,"_id":${JSON.stringify(id)}}\n`;
}
