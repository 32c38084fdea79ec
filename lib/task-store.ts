// tasks.db: the dispatch queue on disk (PROTOCOL.md part C). A task sent to `any:<tag>` is kept
// here from before its ack until it is answered, failed or expired, so waiting and in-progress
// tasks survive a restart or a crash. Each task is one document written once; each assignment
// adds a small marker document, so a task's attempts are known after a restart without ever
// rewriting the task. Writes are batched per tick (one NeDB append), like queue.db.
//
// The dispatcher sees only the TaskStore interface, so the same scheduler can later keep its
// state somewhere shared by several nodes.

import fs from 'node:fs/promises';
import type Datastore from '@seald-io/nedb';
import type { Logger } from './logger';
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
  docs: Record<string, unknown>[];
  resolve: () => void;
  reject: (error: Error) => void;
}

const ASSIGNMENT = '@';

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

export class NedbTaskStore implements TaskStore {
  private readonly loaded: LoadedTask[];
  private seq: number;
  private count: number;
  private inserts: PendingInsert[] = [];
  private looseInserts: Record<string, unknown>[] = [];
  private removals: string[] = [];
  private scheduled = false;
  private writing: Promise<void> = Promise.resolve();

  private constructor(
    private readonly db: Datastore<Record<string, unknown>>,
    private readonly filename: string,
    private readonly logger: Logger,
    private readonly fsync: boolean,
  ) {
    const tasks = new Map<string, LoadedTask>();
    const attempts = new Map<string, number>();
    for (const doc of db.getAllData()) {
      const id = typeof doc._id === 'string' ? doc._id : '';
      const at = id.indexOf(ASSIGNMENT);
      if (at > 0) {
        const taskId = id.slice(0, at);
        const attempt = typeof doc.attempt === 'number' ? doc.attempt : 0;
        attempts.set(taskId, Math.max(attempts.get(taskId) ?? 0, attempt));
        continue;
      }
      const task = readTask(doc);
      if (task) tasks.set(task._id, { task, attempts: 0 });
      else logger.warn('task_skipped', { reason: 'unreadable document' });
    }
    for (const [taskId, attempt] of attempts) {
      const entry = tasks.get(taskId);
      if (entry) entry.attempts = attempt;
      // A marker whose task is gone was left by a removal cut short; drop it with the next batch.
      else this.removals.push(`${taskId}${ASSIGNMENT}${attempt}`);
    }
    this.loaded = [...tasks.values()].sort((a, b) => a.task.seq - b.task.seq);
    this.seq = this.loaded.length > 0 ? this.loaded[this.loaded.length - 1]!.task.seq + 1 : 1;
    this.count = this.loaded.length;
  }

  static async open(filename: string, logger: Logger, options: { compactionIntervalMs: number; fsync: boolean }): Promise<NedbTaskStore> {
    const db = await openDatastore<Record<string, unknown>>(filename, logger, options.compactionIntervalMs);
    return new NedbTaskStore(db, filename, logger, options.fsync);
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
    const docs: Record<string, unknown>[] = [{ ...task }];
    if (firstAssignee !== null) docs.push(assignmentDoc(task._id, firstAssignee, 1));
    return new Promise((resolve, reject) => {
      this.inserts.push({ docs, resolve, reject });
      this.schedule();
    });
  }

  assigned(taskId: string, employeeId: string, attempt: number): void {
    this.looseInserts.push(assignmentDoc(taskId, employeeId, attempt));
    this.schedule();
  }

  remove(taskId: string, attempts: number): void {
    this.count--;
    this.removals.push(taskId);
    for (let attempt = 1; attempt <= attempts; attempt++) this.removals.push(`${taskId}${ASSIGNMENT}${attempt}`);
    this.schedule();
  }

  flush(): Promise<void> {
    this.writing = this.writing.then(() => this.writeBatch());
    return this.writing;
  }

  async close(): Promise<void> {
    await this.flush();
    this.db.stopAutocompaction();
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
    const loose = this.looseInserts;
    const removals = this.removals;
    this.inserts = [];
    this.looseInserts = [];
    this.removals = [];
    if (inserts.length > 0 || loose.length > 0) {
      try {
        await this.db.insertAsync([...inserts.flatMap((insert) => insert.docs), ...loose]);
        if (this.fsync) await this.syncFile();
        for (const insert of inserts) insert.resolve();
      } catch (error) {
        this.logger.error('task_write_failed', { tasks: inserts.length, error: (error as Error).message });
        for (const insert of inserts) insert.reject(error as Error);
      }
    }
    if (removals.length > 0) {
      try {
        await this.db.removeAsync({ _id: { $in: removals } }, { multi: true });
      } catch (error) {
        this.logger.error('task_remove_failed', { documents: removals.length, error: (error as Error).message });
      }
    }
  }

  private async syncFile(): Promise<void> {
    const handle = await fs.open(this.filename, 'r+');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
}

function assignmentDoc(taskId: string, employeeId: string, attempt: number): Record<string, unknown> {
  return { _id: `${taskId}${ASSIGNMENT}${attempt}`, employee_id: employeeId, attempt };
}
