// Dispatch (PROTOCOL.md part C): a message to `any:<tag>` goes to exactly one available
// employee with the tag (fewest tasks in progress, then idle longest), or waits in the tag's
// queue until one is free. Each delivery is a lease: an answer (a reply with in_reply_to, or
// task_done) ends it; a timeout, a disconnect, a ban or task_done with failed:true sends the task
// back to the front of its queue, up to --max-attempts. Tasks are on disk (TaskStore) before the
// sender's ack, so waiting and in-progress work survives a restart.
//
// The router hands `any:` targets, replies, status and task_done frames here; frames go out
// through the router's sessions (DispatchLink). Nothing here scans every task per message: each
// tag keeps its queues by priority, and the employees carrying it.

import type { EventBus } from './events';
import type { Identity } from './identity-store';
import type { Logger } from './logger';
import {
  anyTargetName,
  PRIORITIES,
  type DeliveryFailure,
  type EmployeeStatus,
  type Priority,
} from './protocol';
import type { LoadedTask, StoredTask, TaskStore } from './task-store';

/** What the dispatcher needs of the router: writing to whoever is connected. */
export interface DispatchLink {
  /** Writes a frame to the identity's open session; false when it has none. */
  write(id: string, text: string): boolean;
  /** A queued task's messages.db record settled (delivered on first assignment, expired or failed). */
  settleRecord(recordId: string, target: string, status: 'delivered' | 'expired'): void;
}

export interface DispatcherOptions {
  store: TaskStore;
  bus: EventBus;
  logger: Logger;
  link: DispatchLink;
  maxAttempts: number;
  /** How long a task that cannot queue may still wait after a lost lease. */
  maxQueueTtlMs: number;
}

export type TaskState = 'storing' | 'waiting' | 'in_progress' | 'settled';
export type LeaseLoss = 'timeout' | 'disconnected' | 'failed' | 'restart';

interface Task {
  stored: StoredTask;
  target: string;
  state: TaskState;
  /** Assignments made so far; the current one's number while in progress. */
  attempt: number;
  employee: Worker | null;
  lease: NodeJS.Timeout | null;
  /** Since when it waits (for the wait-time metric and age). */
  waitingSince: number;
  /** Went back to its queue after a lost lease: goes before fresh tasks of its priority. */
  retried: boolean;
  /** The messages.db record still listing the target as queued, while known. */
  recordId: string | null;
}

interface Worker {
  id: string;
  identity: Identity;
  status: EmployeeStatus;
  capacity: number;
  tasks: Set<Task>;
  online: boolean;
  /** The tag groups it is in while online, and the tasks-in-progress bucket it sits in there. */
  joined: TagMembers[];
  bucket: number;
}

/**
 * The online employees carrying one tag, bucketed by tasks in progress. A worker moves to the
 * end of its bucket whenever its count changes, so within a bucket the first is the one idle
 * longest: choosing is a walk from the front that stops at the first that accepts, not a scan.
 * `open` holds those with room that are not dnd, so "nobody free" is answered at once.
 */
class TagMembers {
  readonly buckets: Set<Worker>[] = [];
  readonly open = new Set<Worker>();
  size = 0;

  add(worker: Worker): void {
    (this.buckets[worker.bucket] ??= new Set()).add(worker);
    this.size++;
  }

  delete(worker: Worker): void {
    if (this.buckets[worker.bucket]?.delete(worker)) this.size--;
    this.open.delete(worker);
  }

  *inOrder(): Generator<Worker> {
    for (const bucket of this.buckets) if (bucket) yield* bucket;
  }
}

/** FIFO with a front for tasks sent back by a lease; stale entries are skipped when reached. */
class TaskDeque {
  private front: Task[] = [];
  private items: Task[] = [];
  private head = 0;

  pushBack(task: Task): void {
    this.items.push(task);
  }

  pushFront(task: Task): void {
    this.front.push(task);
  }

  /** The first task still waiting, dropping stale entries on the way. */
  peek(): Task | undefined {
    while (this.front.length > 0) {
      const task = this.front[this.front.length - 1]!;
      if (task.state === 'waiting') return task;
      this.front.pop();
    }
    while (this.head < this.items.length) {
      const task = this.items[this.head]!;
      if (task.state === 'waiting' && !task.retried) return task;
      this.head++;
    }
    if (this.head > 0) {
      this.items = [];
      this.head = 0;
    }
    return undefined;
  }

  shift(): void {
    if (this.front.length > 0) this.front.pop();
    else this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
  }

  *waiting(): Generator<Task> {
    for (let i = this.front.length - 1; i >= 0; i--) if (this.front[i]!.state === 'waiting') yield this.front[i]!;
    for (let i = this.head; i < this.items.length; i++) {
      const task = this.items[i]!;
      if (task.state === 'waiting' && !task.retried) yield task;
    }
  }
}

class TagQueue {
  readonly byPriority: Record<Priority, TaskDeque> = { high: new TaskDeque(), normal: new TaskDeque(), low: new TaskDeque() };
  waiting = 0;
  inProgress = 0;
}

export interface SubmitInput {
  sender: Identity;
  msgId: string;
  tag: string;
  priority: Priority;
  head: string;
  rest: string;
  timeoutMs: number;
  /** 0: fail when nobody is free; else how long it may wait. */
  queueTtlMs: number;
  now: number;
}

/** Where a submitted task went, as its ack lists it; `stored` settles once it is on disk. */
export interface SubmitResult {
  delivered: string[];
  queued: string[];
  failed: DeliveryFailure[];
  /** Null when nothing is stored (the task failed at once). */
  task: SubmittedTask | null;
}

/** A task between submit and its first write: the router activates it once its record is logged. */
export interface SubmittedTask {
  readonly stored: Promise<void>;
  /** Hands the task out (writes it to its employee, or queues it), after the sender's ack. */
  activate(recordId: string | null): void;
  /** The write failed: forget the task and free its employee. */
  abandon(): void;
}

export interface TaskView {
  msg_id: string;
  from_id: string;
  target: string;
  status: 'waiting' | 'in_progress';
  employee_id: string | null;
  attempt: number;
  priority: Priority;
  age_ms: number;
}

export interface WorkerView {
  status: EmployeeStatus | 'offline';
  capacity: number;
  in_progress: number;
}

export interface TagCounts {
  waiting: number;
  in_progress: number;
}

const DEFAULT_CAPACITY = 1;

export class Dispatcher {
  private readonly workers = new Map<string, Worker>();
  /** Online workers per tag; "*" holds every online employee. */
  private readonly byTag = new Map<string, TagMembers>();
  private readonly queues = new Map<string, TagQueue>();
  /** Live tasks (storing, waiting or in progress) by id. */
  private readonly tasks = new Map<string, Task>();
  /** In-progress tasks by employee and msg_id, to match answers. */
  private readonly held = new Map<string, Task>();
  /** Set while the relay shuts down: leases are not lost to the sockets closing. */
  private closing = false;

  constructor(private readonly options: DispatcherOptions) {}

  /** Tasks found on disk at start: every one waits; those that were in progress go first. */
  restore(now: number): void {
    const loaded: LoadedTask[] = this.options.store.load();
    for (const { task: stored, attempts } of loaded) {
      const task = this.newTask(stored, now);
      task.attempt = attempts;
      this.tasks.set(stored._id, task);
      if (attempts >= this.options.maxAttempts) {
        this.fail(task, 'max_attempts', now);
        continue;
      }
      task.state = 'waiting';
      this.queueOf(stored.tag).waiting++;
      if (attempts > 0) {
        task.retried = true;
        this.options.bus.publish({ type: 'task_retried', ...this.eventBase(task), employee_id: null, attempt: attempts, reason: 'restart', at: now });
      }
    }
    // Fronts are stacks: push the retried ones last-first so the oldest comes out first.
    const retried = [...this.tasks.values()].filter((t) => t.state === 'waiting' && t.retried);
    for (let i = retried.length - 1; i >= 0; i--) this.queueOf(retried[i]!.stored.tag).byPriority[retried[i]!.stored.priority].pushFront(retried[i]!);
    for (const task of this.tasks.values()) {
      if (task.state === 'waiting' && !task.retried) this.queueOf(task.stored.tag).byPriority[task.stored.priority].pushBack(task);
    }
  }

  // ---- employees ---------------------------------------------------------------------------

  /** An employee authenticated: it starts idle, with the capacity it gave (else its last, else 1). */
  online(identity: Identity, capacity: number | undefined): void {
    if (identity.role !== 'employee') return;
    let worker = this.workers.get(identity.id);
    if (worker?.online) this.leaveTags(worker);
    if (!worker) {
      worker = { id: identity.id, identity, status: 'idle', capacity: capacity ?? DEFAULT_CAPACITY, tasks: new Set(), online: true, joined: [], bucket: 0 };
      this.workers.set(identity.id, worker);
    }
    worker.identity = identity;
    worker.status = 'idle';
    if (capacity !== undefined) worker.capacity = capacity;
    worker.online = true;
    this.joinTags(worker);
    this.pump(worker, Date.now());
  }

  /** An employee's connection ended: its tasks go back to their queues. */
  offline(id: string): void {
    const worker = this.workers.get(id);
    if (!worker || !worker.online || this.closing) return;
    worker.online = false;
    this.leaveTags(worker);
    const now = Date.now();
    for (const task of [...worker.tasks]) this.loseLease(task, 'disconnected', now);
  }

  /** A status frame: new status and/or capacity; answers with what now holds. */
  setStatus(identity: Identity, status: EmployeeStatus | undefined, capacity: number | undefined): WorkerView {
    const worker = this.workers.get(identity.id);
    if (!worker) return { status: status ?? 'idle', capacity: capacity ?? DEFAULT_CAPACITY, in_progress: 0 };
    if (status !== undefined) worker.status = status;
    if (capacity !== undefined) worker.capacity = capacity;
    this.regroup(worker);
    const view = this.workerView(worker);
    this.pump(worker, Date.now());
    return view;
  }

  workerOf(id: string): WorkerView | null {
    const worker = this.workers.get(id);
    return worker ? this.workerView(worker) : null;
  }

  private workerView(worker: Worker): WorkerView {
    return { status: worker.online ? worker.status : 'offline', capacity: worker.capacity, in_progress: worker.tasks.size };
  }

  private joinTags(worker: Worker): void {
    worker.bucket = worker.tasks.size;
    for (const tag of [...worker.identity.tags, '*']) {
      let members = this.byTag.get(tag);
      if (!members) this.byTag.set(tag, (members = new TagMembers()));
      members.add(worker);
      worker.joined.push(members);
    }
    this.regroup(worker);
  }

  private leaveTags(worker: Worker): void {
    for (const members of worker.joined) members.delete(worker);
    worker.joined = [];
    for (const [tag, members] of this.byTag) if (members.size === 0) this.byTag.delete(tag);
  }

  /** After its count, status, capacity or ban changed: its bucket (moving to the end) and whether it is open. */
  private regroup(worker: Worker): void {
    const count = worker.tasks.size;
    const open = !worker.identity.banned && worker.status !== 'dnd' && count < worker.capacity;
    for (const members of worker.joined) {
      if (worker.bucket !== count) {
        members.buckets[worker.bucket]?.delete(worker);
        (members.buckets[count] ??= new Set()).add(worker);
      }
      if (open) members.open.add(worker);
      else members.open.delete(worker);
    }
    worker.bucket = count;
  }

  /** Free for a task of this priority: connected, unbanned, not dnd, under capacity; working takes only high. */
  private accepts(worker: Worker, priority: Priority): boolean {
    if (!worker.online || worker.identity.banned || worker.status === 'dnd') return false;
    if (worker.tasks.size >= worker.capacity) return false;
    return worker.status !== 'working' || priority === 'high';
  }

  /** Fewest tasks in progress, then idle longest (see TagMembers). */
  private choose(tag: string, priority: Priority, excludeId: string): Worker | null {
    const members = this.byTag.get(tag);
    if (!members || members.open.size === 0) return null;
    for (const worker of members.inOrder()) {
      if (worker.id !== excludeId && this.accepts(worker, priority)) return worker;
    }
    return null;
  }

  // ---- submitting ----------------------------------------------------------------------------

  submit(input: SubmitInput): SubmitResult {
    const target = anyTargetName(input.tag);
    // The sender never gets its own task (as with tag: routing).
    const worker = this.choose(input.tag, input.priority, input.sender.id);
    if (worker === null && input.queueTtlMs <= 0) {
      return { delivered: [], queued: [], failed: [{ id: target, reason: 'no_available_target' }], task: null };
    }
    const { store } = this.options;
    const seq = store.nextSeq();
    const stored: StoredTask = {
      _id: `t${seq.toString(36)}-${input.now.toString(36)}`,
      seq,
      msg_id: input.msgId,
      from_id: input.sender.id,
      from_role: input.sender.role,
      tag: input.tag,
      priority: input.priority,
      head: input.head,
      rest: input.rest,
      timeout_ms: input.timeoutMs,
      created_at: input.now,
      expires_at: input.now + (input.queueTtlMs > 0 ? input.queueTtlMs : this.options.maxQueueTtlMs),
    };
    const task = this.newTask(stored, input.now);
    this.tasks.set(stored._id, task);
    if (worker !== null) this.reserve(task, worker, 1);
    const written = store.add(stored, worker?.id ?? null);
    const submitted: SubmittedTask = {
      stored: written,
      activate: (recordId) => this.activate(task, recordId),
      abandon: () => this.abandon(task),
    };
    return worker !== null
      ? { delivered: [worker.id], queued: [], failed: [], task: submitted }
      : { delivered: [], queued: [target], failed: [], task: submitted };
  }

  private newTask(stored: StoredTask, now: number): Task {
    return {
      stored,
      target: anyTargetName(stored.tag),
      state: 'storing',
      attempt: 0,
      employee: null,
      lease: null,
      waitingSince: now,
      retried: false,
      recordId: null,
    };
  }

  /** Takes the worker's slot now, so later messages see it busy while the task is written. */
  private reserve(task: Task, worker: Worker, attempt: number): void {
    task.state = 'in_progress';
    task.attempt = attempt;
    task.employee = worker;
    worker.tasks.add(task);
    this.regroup(worker);
    this.held.set(heldKey(worker.id, task.stored.msg_id), task);
    this.queueOf(task.stored.tag).inProgress++;
  }

  private activate(task: Task, recordId: string | null): void {
    const now = Date.now();
    if (task.state === 'in_progress' && task.employee !== null) {
      // Unless a lost lease already handed it to another employee while it was being written.
      if (task.lease === null) this.send(task, now);
      return;
    }
    if (task.state === 'waiting') return; // sent back while being written (its employee left)
    if (task.state !== 'storing') return;
    task.recordId = recordId;
    task.state = 'waiting';
    task.waitingSince = now;
    const queue = this.queueOf(task.stored.tag);
    queue.waiting++;
    queue.byPriority[task.stored.priority].pushBack(task);
    this.dispatchWaiting(task.stored.tag, now);
  }

  private abandon(task: Task): void {
    if (task.state === 'settled') return; // expired while being written: already removed
    // Its write failed, but the store holds it in memory: remove it, or a compaction would write it.
    this.options.store.remove(task.stored._id, Math.max(task.attempt, 0));
    const worker = task.employee;
    if (task.state === 'in_progress' && worker !== null) this.release(task, worker);
    if (task.state === 'waiting') this.queueOf(task.stored.tag).waiting--;
    task.state = 'settled';
    this.tasks.delete(task.stored._id);
    if (worker !== null) this.pump(worker, Date.now());
  }

  // ---- handing out ---------------------------------------------------------------------------

  /** Writes the task to its reserved employee and starts the lease. */
  private send(task: Task, now: number): void {
    const worker = task.employee!;
    const { stored } = task;
    const frame = `${stored.head}${worker.id}","dispatch":${JSON.stringify(task.target)},"attempt":${task.attempt}${stored.rest}`;
    if (!this.options.link.write(worker.id, frame)) {
      // Its socket closed without the disconnect reaching us yet: treat it as gone.
      this.loseLease(task, 'disconnected', now);
      return;
    }
    task.lease = setTimeout(() => this.loseLease(task, 'timeout', Date.now()), stored.timeout_ms);
    task.lease.unref();
    if (task.recordId !== null) {
      // The record listed the target as queued: its first assignment settles it.
      this.options.link.settleRecord(task.recordId, task.target, 'delivered');
      task.recordId = null;
    }
    this.notifySender(task, worker.id, 'assigned', now);
    this.options.bus.publish({
      type: 'task_assigned',
      ...this.eventBase(task),
      employee_id: worker.id,
      attempt: task.attempt,
      wait_ms: Math.max(0, now - task.waitingSince),
      at: now,
    });
  }

  /** Hands waiting tasks of this tag (and what `any:*` waits for) to whoever is free. */
  private dispatchWaiting(tag: string, now: number, skip: Worker | null = null): void {
    const members = this.byTag.get(tag);
    if (!members) return;
    for (const worker of [...members.open]) {
      if (worker === skip) continue;
      this.pump(worker, now);
      const queue = this.queues.get(tag);
      if (!queue || queue.waiting === 0) return;
    }
  }

  /** Gives a free worker the best waiting tasks among its tags, until it is full. */
  private pump(worker: Worker, now: number): void {
    while (worker.online) {
      const task = this.nextFor(worker);
      if (task === null) return;
      const attempt = task.attempt + 1;
      this.take(task);
      this.reserve(task, worker, attempt);
      this.options.store.assigned(task.stored._id, worker.id, task.attempt);
      this.send(task, now);
    }
  }

  /** The first waiting task this worker may take: highest priority, retried first, then oldest. */
  private nextFor(worker: Worker): Task | null {
    if (worker.tasks.size >= worker.capacity || worker.status === 'dnd' || worker.identity.banned) return null;
    for (const priority of PRIORITIES) {
      if (!this.accepts(worker, priority)) continue;
      let best: Task | null = null;
      for (const tag of worker.identity.tags) best = this.better(best, this.queues.get(tag), priority, worker.id);
      best = this.better(best, this.queues.get('*'), priority, worker.id);
      if (best !== null) return best;
    }
    return null;
  }

  private better(best: Task | null, queue: TagQueue | undefined, priority: Priority, workerId: string): Task | null {
    if (!queue || queue.waiting === 0) return best;
    const head = queue.byPriority[priority].peek();
    if (head === undefined || head.stored.from_id === workerId) return best;
    if (best === null) return head;
    if (head.retried !== best.retried) return head.retried ? head : best;
    return head.stored.seq < best.stored.seq ? head : best;
  }

  /** Takes a task that is at the head of its queue out of it. */
  private take(task: Task): void {
    const queue = this.queueOf(task.stored.tag);
    queue.byPriority[task.stored.priority].shift();
    queue.waiting--;
    task.retried = false;
  }

  // ---- answers and lost leases -----------------------------------------------------------------

  /** A message from an employee with in_reply_to: ends its task when it answers that task's sender. */
  replied(employeeId: string, inReplyTo: string, toIds: readonly string[]): void {
    const task = this.held.get(heldKey(employeeId, inReplyTo));
    if (!task || !toIds.includes(task.stored.from_id)) return;
    this.complete(task, Date.now());
  }

  /** task_done from an employee: false when it holds no such task. */
  taskDone(employeeId: string, msgId: string, failed: boolean): boolean {
    const task = this.held.get(heldKey(employeeId, msgId));
    if (!task) return false;
    const now = Date.now();
    if (failed) this.loseLease(task, 'failed', now);
    else this.complete(task, now);
    return true;
  }

  private complete(task: Task, now: number): void {
    const worker = task.employee!;
    this.release(task, worker);
    task.state = 'settled';
    this.tasks.delete(task.stored._id);
    this.options.store.remove(task.stored._id, task.attempt);
    this.notifySender(task, worker.id, 'done', now);
    this.options.bus.publish({ type: 'task_done', ...this.eventBase(task), employee_id: worker.id, attempt: task.attempt, at: now });
    this.pump(worker, now);
  }

  private release(task: Task, worker: Worker): void {
    if (task.lease) clearTimeout(task.lease);
    task.lease = null;
    worker.tasks.delete(task);
    this.held.delete(heldKey(worker.id, task.stored.msg_id));
    this.regroup(worker);
    task.employee = null;
    this.queueOf(task.stored.tag).inProgress--;
  }

  /** The lease ended unanswered: back to the front of its queue, or failed after the last attempt. */
  private loseLease(task: Task, reason: LeaseLoss, now: number): void {
    const worker = task.employee;
    if (task.state !== 'in_progress' || worker === null) return;
    this.release(task, worker);
    if (task.attempt >= this.options.maxAttempts) {
      this.fail(task, 'max_attempts', now);
    } else {
      task.state = 'waiting';
      task.retried = true;
      task.waitingSince = now;
      const queue = this.queueOf(task.stored.tag);
      queue.waiting++;
      queue.byPriority[task.stored.priority].pushFront(task);
      this.options.bus.publish({ type: 'task_retried', ...this.eventBase(task), employee_id: worker.id, attempt: task.attempt, reason, at: now });
      // Someone else first; the employee that lost it gets it back only if nobody else is free.
      this.dispatchWaiting(task.stored.tag, now, worker);
    }
    if (worker.online && reason !== 'disconnected') this.pump(worker, now);
  }

  private fail(task: Task, reason: 'max_attempts' | 'expired', now: number): void {
    if (task.state === 'waiting') this.queueOf(task.stored.tag).waiting--;
    task.state = 'settled';
    this.tasks.delete(task.stored._id);
    this.options.store.remove(task.stored._id, Math.max(task.attempt, 0));
    const status = reason === 'expired' ? 'expired' : 'failed';
    if (task.recordId !== null) this.options.link.settleRecord(task.recordId, task.target, 'expired');
    task.recordId = null;
    this.notifySender(task, task.target, status, now);
    this.options.bus.publish({ type: 'task_failed', ...this.eventBase(task), attempt: task.attempt, reason, at: now });
  }

  /** Waiting tasks past their deadline; run from the relay's once-a-second timer. */
  expire(now: number): void {
    for (const queue of this.queues.values()) {
      if (queue.waiting === 0) continue;
      for (const deque of Object.values(queue.byPriority)) {
        for (const task of [...deque.waiting()]) if (task.stored.expires_at <= now) this.fail(task, 'expired', now);
      }
    }
  }

  private notifySender(task: Task, id: string, status: 'assigned' | 'done' | 'failed' | 'expired', now: number): void {
    const attempt = status === 'assigned' ? `,"attempt":${task.attempt}` : '';
    this.options.link.write(
      task.stored.from_id,
      `{"type":"delivery_update","msg_id":${JSON.stringify(task.stored.msg_id)},"id":${JSON.stringify(id)},"status":"${status}","dispatch":${JSON.stringify(task.target)}${attempt},"timestamp":${now}}`,
    );
  }

  private eventBase(task: Task): { msg_id: string; from_id: string; target: string; priority: Priority } {
    return { msg_id: task.stored.msg_id, from_id: task.stored.from_id, target: task.target, priority: task.stored.priority };
  }

  private queueOf(tag: string): TagQueue {
    let queue = this.queues.get(tag);
    if (!queue) this.queues.set(tag, (queue = new TagQueue()));
    return queue;
  }

  // ---- views ---------------------------------------------------------------------------------

  /** Waiting and in-progress counts per tag (tags with neither are left out). */
  counts(): Record<string, TagCounts> {
    const out: Record<string, TagCounts> = {};
    for (const [tag, queue] of this.queues) {
      if (queue.waiting > 0 || queue.inProgress > 0) out[tag] = { waiting: queue.waiting, in_progress: queue.inProgress };
    }
    return out;
  }

  get liveTasks(): number {
    return this.tasks.size;
  }

  /** Tasks in progress and waiting, oldest first; at most `limit`, optionally of one tag. */
  list(now: number, limit: number, tag: string | null): { total: number; tasks: TaskView[] } {
    const tasks: TaskView[] = [];
    let total = 0;
    for (const task of this.tasks.values()) {
      if (task.state !== 'waiting' && task.state !== 'in_progress') continue;
      if (tag !== null && task.stored.tag !== tag) continue;
      total++;
      if (tasks.length >= limit) continue;
      tasks.push({
        msg_id: task.stored.msg_id,
        from_id: task.stored.from_id,
        target: task.target,
        status: task.state,
        employee_id: task.employee?.id ?? null,
        attempt: task.attempt,
        priority: task.stored.priority,
        age_ms: Math.max(0, now - task.stored.created_at),
      });
    }
    return { total, tasks };
  }

  /** Ends lease timers (the relay is closing; the tasks stay on disk). */
  close(): void {
    this.closing = true;
    for (const task of this.tasks.values()) if (task.lease) clearTimeout(task.lease);
  }
}

function heldKey(employeeId: string, msgId: string): string {
  return `${employeeId}\n${msgId}`;
}
