// Dispatch (`any:<tag>`, PROTOCOL.md part C) across the nodes of a cluster. The shared state
// lives in Redis (keys `<cluster>:dispatch:*`, listed in docs/CLUSTER.md): each online
// employee's availability, the tasks, the per-tag per-priority waiting queues, the leases. The
// Lua scripts of lib/redis-dispatch-scripts.ts choose and reserve atomically; this file is what
// a node does around them.
//
// The node holding an employee's socket owns its leases: it writes the task frame, runs the
// lease timer and reports the end (reply, task_done, timeout, disconnect). An assignment made on
// another node reaches it on its `dispatch:<node>` channel; a delivery_update for a sender held
// elsewhere goes to the sender's node the same way. Nothing here is on a single node's path.

import type Redis from 'ioredis';
import type { DispatchLink, SubmitInput, SubmitResult, TagCounts, TaskView, WorkerView } from './dispatch';
import type { EventBus } from './events';
import type { Identity } from './identity-store';
import type { Logger } from './logger';
import { anyTargetName, isPlainObject, type EmployeeStatus, type Priority } from './protocol';
import { closeRedis, connectRedis } from './redis-connection';
import {
  ABANDON_SCRIPT,
  ACTIVATE_SCRIPT,
  FINISH_SCRIPT,
  OFFLINE_SCRIPT,
  ONLINE_SCRIPT,
  PUMP_SCRIPT,
  REAP_SCRIPT,
  STATUS_SCRIPT,
  SUBMIT_SCRIPT,
  SWEEP_SCRIPT,
} from './redis-dispatch-scripts';
import type { SharedDispatchReads, TaskDispatch, TaskList } from './task-dispatch';

/** How often a node sweeps expired tasks and orphaned leases, looks for dead nodes and refreshes its counts. */
export const DISPATCH_TICK_MS = 1000;
/**
 * A task reserved for an employee of this node that has not reached it this long after (its
 * assignment was lost on the way: the node that made it died, or a publish was dropped) is
 * taken up by this node from the store.
 */
export const ADOPT_AFTER_MS = 15_000;
/** How long an assignment whose end is written stays remembered (a read of the store from before its end may still be answered). */
const ENDED_KEPT_MS = 5000;

export interface ClusterDispatchOptions {
  url: string;
  clusterName: string;
  nodeId: string;
  bus: EventBus;
  logger: Logger;
  /** Writes to sessions of this node; settles this node's messages.db records. */
  link: DispatchLink;
  /** The node holding an identity's session, as this node last heard (the cluster's presence mirror). */
  locate(id: string): string | undefined;
  maxAttempts: number;
  maxQueueTtlMs: number;
}

/** A task body as stored in Redis: what the employee's node needs to write it. */
interface TaskBody {
  msg_id: string;
  from_id: string;
  tag: string;
  priority: Priority;
  head: string;
  rest: string;
  timeout_ms: number;
}

/** An employee reserved for a task, as the scripts return it. */
interface Assignment {
  id: string;
  emp: string;
  node: string;
  attempt: number;
  body: string;
  since: number;
  record: string;
  origin: string;
}

/** A lease that ended in a script: done, requeued, failed, or stale (ended already). */
interface Ended {
  result: 'done' | 'requeued' | 'failed' | 'stale';
  id: string;
  emp?: string;
  attempt?: number;
  body?: string;
  reason?: string;
}

type ChannelMessage =
  | { t: 'task'; a: Assignment }
  | { t: 'write'; id: string; text: string }
  | { t: 'settle'; record: string; target: string; status: 'delivered' | 'expired' };

interface LocalTask {
  id: string;
  body: TaskBody;
  target: string;
  attempt: number;
  lease: NodeJS.Timeout | null;
}

interface LocalWorker {
  identity: Identity;
  status: EmployeeStatus;
  capacity: number;
  /** In progress here, by msg_id. */
  tasks: Map<string, LocalTask>;
}

type LeaseLoss = 'timeout' | 'disconnected' | 'failed' | 'restart';

export class ClusterDispatch implements TaskDispatch {
  private readonly prefix: string;
  private readonly workers = new Map<string, LocalWorker>();
  /** Assignments (task id @ attempt) written here: 0 while in progress, then when their end was written. */
  private readonly started = new Map<string, number>();
  /** Counts online() calls, so a check of the store that crossed one is not acted on. */
  private onlineSeq = 0;
  private cachedCounts: Record<string, TagCounts> = {};
  private timer: NodeJS.Timeout | null = null;
  private ticking = false;
  private closing = false;
  readonly shared: SharedDispatchReads;

  private constructor(
    private readonly options: ClusterDispatchOptions,
    private readonly redis: Redis,
    private readonly sub: Redis,
  ) {
    this.prefix = `${options.clusterName}:dispatch:`;
    this.shared = { tasks: (now, limit, tag) => this.readTasks(now, limit, tag), workers: (ids) => this.readWorkers(ids) };
  }

  static async connect(options: ClusterDispatchOptions): Promise<ClusterDispatch> {
    const redis = await connectRedis(options.url, `mimiclaw:${options.nodeId}:dispatch`);
    let sub: Redis | null = null;
    try {
      sub = await connectRedis(options.url, `mimiclaw:${options.nodeId}:dispatch-sub`);
      const dispatch = new ClusterDispatch(options, redis, sub);
      sub.on('message', (_channel: string, text: string) => dispatch.onMessage(text));
      await sub.subscribe(dispatch.channel(options.nodeId));
      // What this node id's previous process left (killed, or stopped with a Redis outage) goes back to the queues.
      await dispatch.reap(options.nodeId, true);
      dispatch.timer = setInterval(() => void dispatch.tick(), DISPATCH_TICK_MS);
      dispatch.timer.unref();
      redis.on('ready', () => void dispatch.resync());
      return dispatch;
    } catch (error) {
      redis.disconnect();
      sub?.disconnect();
      throw error;
    }
  }

  private get nodeId(): string {
    return this.options.nodeId;
  }

  private channel(node: string): string {
    return `${this.options.clusterName}:dispatch:${node}`;
  }

  private async run(lua: string, args: (string | number)[]): Promise<Record<string, unknown>> {
    const text = await this.redis.eval(
      lua,
      0,
      this.prefix,
      `${this.options.clusterName}:banned`,
      Date.now(),
      this.options.maxAttempts,
      `${this.options.clusterName}:node:`,
      ...args,
    );
    const parsed: unknown = JSON.parse(String(text));
    return isPlainObject(parsed) ? parsed : {};
  }

  /** Runs a script whose outcome only hands out work; a failure is logged (the tick retries what matters). */
  private runAndHandOut(name: string, lua: string, args: (string | number)[]): void {
    this.run(lua, args).then(
      (result) => this.handOut(list<Assignment>(result.assignments)),
      (error: Error) => this.options.logger.warn('dispatch_store_failed', { step: name, error: error.message }),
    );
  }

  // ---- employees of this node ----------------------------------------------------------------

  online(identity: Identity, capacity: number | undefined): void {
    if (identity.role !== 'employee') return;
    this.onlineSeq++;
    const previous = this.workers.get(identity.id);
    const worker: LocalWorker = {
      identity,
      status: 'idle',
      capacity: capacity ?? previous?.capacity ?? 1,
      tasks: previous?.tasks ?? new Map(),
    };
    this.workers.set(identity.id, worker);
    const tags = JSON.stringify([...identity.tags, '*']);
    this.run(ONLINE_SCRIPT, [identity.id, this.nodeId, capacity ?? '', tags, worker.tasks.size, 'idle']).then(
      (result) => {
        // Its last capacity (perhaps set on another node) when it gave none.
        if (capacity === undefined && typeof result.capacity === 'number' && this.workers.get(identity.id) === worker) worker.capacity = result.capacity;
        this.handOut(list<Assignment>(result.assignments));
      },
      (error: Error) => this.options.logger.warn('dispatch_store_failed', { step: 'online', error: error.message }),
    );
  }

  offline(id: string): void {
    const worker = this.workers.get(id);
    if (!worker || this.closing) return;
    this.workers.delete(id);
    this.runAndHandOut('offline', OFFLINE_SCRIPT, [id, this.nodeId]);
    for (const task of worker.tasks.values()) this.endLease(id, worker, task, 'lost', 'disconnected');
  }

  setStatus(identity: Identity, status: EmployeeStatus | undefined, capacity: number | undefined): WorkerView {
    const worker = this.workers.get(identity.id);
    if (!worker) return { status: status ?? 'idle', capacity: capacity ?? 1, in_progress: 0 };
    if (status !== undefined) worker.status = status;
    if (capacity !== undefined) worker.capacity = capacity;
    this.runAndHandOut('status', STATUS_SCRIPT, [identity.id, this.nodeId, status ?? '', capacity ?? '']);
    return { status: worker.status, capacity: worker.capacity, in_progress: worker.tasks.size };
  }

  workerOf(id: string): WorkerView | null {
    const worker = this.workers.get(id);
    return worker ? { status: worker.status, capacity: worker.capacity, in_progress: worker.tasks.size } : null;
  }

  // ---- submitting ----------------------------------------------------------------------------

  async submit(input: SubmitInput): Promise<SubmitResult> {
    const target = anyTargetName(input.tag);
    const ttl = input.queueTtlMs > 0 ? input.queueTtlMs : this.options.maxQueueTtlMs;
    const body: TaskBody = {
      msg_id: input.msgId,
      from_id: input.sender.id,
      tag: input.tag,
      priority: input.priority,
      head: input.head,
      rest: input.rest,
      timeout_ms: input.timeoutMs,
    };
    const result = await this.run(SUBMIT_SCRIPT, [
      input.tag,
      input.priority,
      input.sender.id,
      input.queueTtlMs > 0 ? '1' : '0',
      JSON.stringify(body),
      input.timeoutMs,
      input.now + ttl,
      this.nodeId,
    ]);
    const id = String(result.id);
    const stored = Promise.resolve();
    const abandon = () => this.runAndHandOut('abandon', ABANDON_SCRIPT, [id, this.nodeId]);
    if (result.result === 'assigned' && isPlainObject(result.assignment)) {
      const assignment = result.assignment as unknown as Assignment;
      return { delivered: [assignment.emp], queued: [], failed: [], task: { stored, activate: () => this.handOut([assignment]), abandon } };
    }
    if (result.result === 'queued') {
      return {
        delivered: [],
        queued: [target],
        failed: [],
        task: { stored, activate: (recordId) => this.runAndHandOut('activate', ACTIVATE_SCRIPT, [id, this.nodeId, recordId ?? '']), abandon },
      };
    }
    return { delivered: [], queued: [], failed: [{ id: target, reason: 'no_available_target' }], task: null };
  }

  // ---- handing out ---------------------------------------------------------------------------

  /** Each assignment goes to the node holding its employee (this one, or over its channel). */
  private handOut(assignments: Assignment[]): void {
    for (const assignment of assignments) {
      if (assignment.node === this.nodeId) this.start(assignment);
      else this.sendTask(assignment);
    }
  }

  /** To the employee's node; when no node listens there (it died a moment ago) the task goes back at once. */
  private sendTask(assignment: Assignment): void {
    this.redis.publish(this.channel(assignment.node), JSON.stringify({ t: 'task', a: assignment } satisfies ChannelMessage)).then(
      (receivers) => {
        const body = receivers === 0 ? parseBody(assignment.body) : null;
        if (body === null) return;
        this.finish({ id: assignment.id, body, target: anyTargetName(body.tag), attempt: assignment.attempt, lease: null }, assignment.emp, 'lost', 'disconnected');
      },
      // The store is away: the lease's short first deadline in Redis hands it out again.
      (error: Error) => this.options.logger.warn('dispatch_publish_failed', { node: assignment.node, error: error.message }),
    );
  }

  /** Writes the task to its employee here and starts the lease. */
  private start(assignment: Assignment): void {
    const body = parseBody(assignment.body);
    if (body === null) return;
    // Each assignment is written once, also when it is both taken up from the store and arrives.
    const key = `${assignment.id}@${assignment.attempt}`;
    if (this.started.has(key)) return;
    this.started.set(key, 0);
    const worker = this.workers.get(assignment.emp);
    const task: LocalTask = { id: assignment.id, body, target: anyTargetName(body.tag), attempt: assignment.attempt, lease: null };
    const frame = `${body.head}${assignment.emp}","dispatch":${JSON.stringify(task.target)},"attempt":${task.attempt}${body.rest}`;
    if (!worker || !this.options.link.write(assignment.emp, frame)) {
      // Its session ended before the task reached it: the task goes back for someone else. Its
      // availability goes too, in case its departure did not reach the store (Redis was away).
      if (!worker) this.runAndHandOut('offline', OFFLINE_SCRIPT, [assignment.emp, this.nodeId]);
      this.finish(task, assignment.emp, 'lost', 'disconnected');
      return;
    }
    worker.tasks.set(body.msg_id, task);
    task.lease = setTimeout(() => {
      if (worker.tasks.get(body.msg_id) === task) this.endLease(assignment.emp, worker, task, 'lost', 'timeout');
    }, body.timeout_ms);
    task.lease.unref();
    const now = Date.now();
    if (assignment.record !== '') this.settle(assignment.origin, assignment.record, task.target, 'delivered');
    this.notifySender(body, assignment.emp, 'assigned', task.attempt, now);
    this.options.bus.publish({
      type: 'task_assigned',
      ...eventBase(body),
      employee_id: assignment.emp,
      attempt: task.attempt,
      wait_ms: Math.max(0, now - assignment.since),
      at: now,
    });
  }

  // ---- answers and lost leases ---------------------------------------------------------------

  replied(employeeId: string, inReplyTo: string, toIds: readonly string[]): void {
    const worker = this.workers.get(employeeId);
    const task = worker?.tasks.get(inReplyTo);
    if (!worker || !task || !toIds.includes(task.body.from_id)) return;
    this.endLease(employeeId, worker, task, 'done', 'done');
  }

  taskDone(employeeId: string, msgId: string, failed: boolean): boolean {
    const worker = this.workers.get(employeeId);
    const task = worker?.tasks.get(msgId);
    if (!worker || !task) return false;
    this.endLease(employeeId, worker, task, failed ? 'lost' : 'done', failed ? 'failed' : 'done');
    return true;
  }

  private endLease(employeeId: string, worker: LocalWorker, task: LocalTask, kind: 'done' | 'lost', reason: LeaseLoss | 'done'): void {
    if (task.lease) clearTimeout(task.lease);
    task.lease = null;
    worker.tasks.delete(task.body.msg_id);
    this.finish(task, employeeId, kind, reason);
  }

  /** Ends the lease in the store and tells the sender; a store failure leaves it to the lease sweep. */
  private finish(task: LocalTask, employeeId: string, kind: 'done' | 'lost', reason: LeaseLoss | 'done'): void {
    const key = `${task.id}@${task.attempt}`;
    const markEnded = () => this.started.has(key) && this.started.set(key, Date.now());
    this.run(FINISH_SCRIPT, [task.id, employeeId, task.attempt, kind, reason]).then(
      (result) => {
        markEnded();
        this.ended(result as unknown as Ended, Date.now());
        this.handOut(list<Assignment>(result.assignments));
      },
      (error: Error) => {
        markEnded();
        this.options.logger.warn('dispatch_store_failed', { step: 'finish', msg_id: task.body.msg_id, error: error.message });
      },
    );
  }

  /** Tells the sender and the event bus how a lease ended. */
  private ended(end: Ended, now: number): void {
    if (end.result === 'stale' || typeof end.body !== 'string') return;
    const body = parseBody(end.body);
    if (body === null) return;
    const attempt = typeof end.attempt === 'number' ? end.attempt : 0;
    const employee = typeof end.emp === 'string' ? end.emp : '';
    if (end.result === 'done') {
      this.notifySender(body, employee, 'done', null, now);
      this.options.bus.publish({ type: 'task_done', ...eventBase(body), employee_id: employee, attempt, at: now });
    } else if (end.result === 'failed') {
      this.notifySender(body, anyTargetName(body.tag), 'failed', null, now);
      this.options.bus.publish({ type: 'task_failed', ...eventBase(body), attempt, reason: 'max_attempts', at: now });
    } else {
      const reason: LeaseLoss = end.reason === 'timeout' || end.reason === 'failed' || end.reason === 'restart' ? end.reason : 'disconnected';
      this.options.bus.publish({ type: 'task_retried', ...eventBase(body), employee_id: employee, attempt, reason, at: now });
    }
  }

  // ---- between nodes -------------------------------------------------------------------------

  private notifySender(body: TaskBody, id: string, status: 'assigned' | 'done' | 'failed' | 'expired', attempt: number | null, now: number): void {
    const attemptField = attempt === null ? '' : `,"attempt":${attempt}`;
    const text = `{"type":"delivery_update","msg_id":${JSON.stringify(body.msg_id)},"id":${JSON.stringify(id)},"status":"${status}","dispatch":${JSON.stringify(anyTargetName(body.tag))}${attemptField},"timestamp":${now}}`;
    this.writeAnywhere(body.from_id, text);
  }

  /** To a session here, else to the node the presence mirror names (a sender offline gets nothing, as on one node). */
  private writeAnywhere(id: string, text: string): void {
    if (this.options.link.write(id, text)) return;
    const node = this.options.locate(id);
    if (node !== undefined && node !== this.nodeId) this.publish(node, { t: 'write', id, text });
  }

  private settle(origin: string, record: string, target: string, status: 'delivered' | 'expired'): void {
    if (origin === this.nodeId) this.options.link.settleRecord(record, target, status);
    else this.publish(origin, { t: 'settle', record, target, status });
  }

  private publish(node: string, message: ChannelMessage): void {
    this.redis.publish(this.channel(node), JSON.stringify(message)).catch((error: Error) => {
      this.options.logger.warn('dispatch_publish_failed', { node, error: error.message });
    });
  }

  private onMessage(text: string): void {
    let message: unknown;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (!isPlainObject(message)) return;
    if (message.t === 'task' && isPlainObject(message.a) && typeof message.a.emp === 'string' && typeof message.a.body === 'string') {
      this.start(message.a as unknown as Assignment);
    } else if (message.t === 'write' && typeof message.id === 'string' && typeof message.text === 'string') {
      this.options.link.write(message.id, message.text);
    } else if (message.t === 'settle' && typeof message.record === 'string' && typeof message.target === 'string') {
      this.options.link.settleRecord(message.record, message.target, message.status === 'expired' ? 'expired' : 'delivered');
    }
  }

  // ---- the once-a-second sweep ---------------------------------------------------------------

  expire(): void {
    // The sweep runs on the dispatch tick (shared by every node, each task once).
  }

  private async tick(): Promise<void> {
    if (this.ticking || this.closing || this.redis.status !== 'ready') return;
    this.ticking = true;
    try {
      const now = Date.now();
      const swept = await this.run(SWEEP_SCRIPT, []);
      for (const gone of list<{ body: string; attempt?: number; record?: string; origin?: string }>(swept.expired)) {
        const body = parseBody(gone.body);
        if (body === null) continue;
        // Never assigned: the sender's record still lists the target as queued.
        if (typeof gone.record === 'string' && gone.record !== '' && typeof gone.origin === 'string') this.settle(gone.origin, gone.record, anyTargetName(body.tag), 'expired');
        this.notifySender(body, anyTargetName(body.tag), 'expired', null, now);
        this.options.bus.publish({ type: 'task_failed', ...eventBase(body), attempt: typeof gone.attempt === 'number' ? gone.attempt : 0, reason: 'expired', at: now });
      }
      for (const end of list<Ended>(swept.lost)) this.ended(end, now);
      this.handOut(list<Assignment>(swept.assignments));
      await this.reapDead();
      await this.rejoinIfReaped();
      await this.adoptOrphans(now);
      await this.refreshCounts();
      await this.pumpIdle();
    } catch (error) {
      this.options.logger.warn('dispatch_tick_failed', { error: (error as Error).message });
    } finally {
      this.ticking = false;
    }
  }

  /** Nodes holding dispatch state whose node key expired (killed): their work goes to the others. */
  private async reapDead(): Promise<void> {
    const nodes = (await this.redis.smembers(`${this.prefix}nodes`)).filter((node) => node !== this.nodeId);
    if (nodes.length === 0) return;
    const alive = await this.redis.mget(nodes.map((node) => `${this.options.clusterName}:node:${node}`));
    for (const [index, node] of nodes.entries()) if (alive[index] === null) await this.reap(node, false);
  }

  /** Tasks the store says are in progress here that never reached this node: written now (see ADOPT_AFTER_MS). */
  private async adoptOrphans(now: number): Promise<void> {
    for (const [key, endedAt] of this.started) if (endedAt !== 0 && now - endedAt > ENDED_KEPT_MS) this.started.delete(key);
    const ids = await this.redis.smembers(`${this.prefix}held:${this.nodeId}`);
    if (ids.length === 0) return;
    const pipeline = this.redis.pipeline();
    for (const id of ids) pipeline.hmget(`${this.prefix}task:${id}`, 'state', 'node', 'emp', 'attempt', 'body', 'since', 'reserved', 'origin');
    const rows = (await pipeline.exec()) ?? [];
    rows.forEach(([error, row], index) => {
      if (error || !Array.isArray(row)) return;
      const [state, node, emp, attempt, body, since, reserved, origin] = row as (string | null)[];
      if (state !== 'in_progress' || node !== this.nodeId || !emp || body === null || now - Number(reserved ?? now) < ADOPT_AFTER_MS) return;
      // Written here already (its end may not be in the store yet when it was read).
      if (this.started.has(`${ids[index]!}@${Number(attempt)}`)) return;
      this.options.logger.warn('dispatch_task_adopted', { task: ids[index] });
      this.start({ id: ids[index]!, emp, node, attempt: Number(attempt), body, since: Number(since ?? now), record: '', origin: origin ?? '' });
    });
  }

  /**
   * A node paused past its TTL was reaped as dead by the others: its tasks went back to the
   * queues (the leases here are void) and its employees left. It writes them again.
   */
  private async rejoinIfReaped(): Promise<void> {
    if (this.workers.size === 0) return;
    const onlineSeq = this.onlineSeq;
    const member = await this.redis.sismember(`${this.prefix}nodes`, this.nodeId);
    // An employee that came online meanwhile wrote this node back already (or is about to).
    if (member === 1 || onlineSeq !== this.onlineSeq) return;
    this.options.logger.warn('dispatch_node_rejoined', { node: this.nodeId, employees: this.workers.size });
    const now = Date.now();
    for (const worker of this.workers.values()) {
      for (const task of worker.tasks.values()) {
        if (task.lease) clearTimeout(task.lease);
        this.started.set(`${task.id}@${task.attempt}`, now);
      }
      worker.tasks.clear();
    }
    await this.resync();
  }

  private async reap(node: string, force: boolean): Promise<void> {
    const result = await this.run(REAP_SCRIPT, [node, force ? '1' : '0']);
    if (result.result !== 'reaped') return;
    const lost = list<Ended>(result.lost);
    if (lost.length > 0) this.options.logger.warn('dispatch_node_reaped', { node, tasks: lost.length });
    const now = Date.now();
    for (const end of lost) this.ended({ ...end, reason: node === this.nodeId ? 'restart' : 'disconnected' }, now);
    this.handOut(list<Assignment>(result.assignments));
  }

  private async refreshCounts(): Promise<void> {
    this.cachedCounts = countsFrom(await this.redis.hgetall(`${this.prefix}count`));
  }

  /** A safety net for a hand-out lost on the way (a node gone between a script and its channel message). */
  private async pumpIdle(): Promise<void> {
    const waiting = Object.keys(this.cachedCounts).filter((tag) => this.cachedCounts[tag]!.waiting > 0);
    if (waiting.length === 0) return;
    const anyone = waiting.includes('*');
    for (const [id, worker] of this.workers) {
      if (worker.status === 'dnd' || worker.tasks.size >= worker.capacity) continue;
      if (!anyone && !worker.identity.tags.some((tag) => waiting.includes(tag))) continue;
      const result = await this.run(PUMP_SCRIPT, [id]);
      this.handOut(list<Assignment>(result.assignments));
    }
  }

  /** After Redis came back: this node's employees are written again with what they hold. */
  private async resync(): Promise<void> {
    if (this.closing) return;
    for (const [id, worker] of this.workers) {
      const tags = JSON.stringify([...worker.identity.tags, '*']);
      const result = await this.run(ONLINE_SCRIPT, [id, this.nodeId, worker.capacity, tags, worker.tasks.size, worker.status]).catch(() => null);
      if (result !== null) this.handOut(list<Assignment>(result.assignments));
    }
  }

  // ---- views ---------------------------------------------------------------------------------

  counts(): Record<string, TagCounts> {
    return this.cachedCounts;
  }

  /** Not asked in a cluster: the admin API reads `shared.tasks` (the whole cluster) instead. */
  list(): TaskList {
    return { total: 0, tasks: [] };
  }

  private async readTasks(now: number, limit: number, tag: string | null): Promise<TaskList & { tags: Record<string, TagCounts> }> {
    const [ids, counts] = await Promise.all([this.redis.zrange(`${this.prefix}all`, '0', '-1'), this.redis.hgetall(`${this.prefix}count`)]);
    this.cachedCounts = countsFrom(counts);
    const pipeline = this.redis.pipeline();
    for (const id of ids) pipeline.hmget(`${this.prefix}task:${id}`, 'state', 'msg', 'from', 'tag', 'emp', 'attempt', 'prio', 'created');
    const rows = (await pipeline.exec()) ?? [];
    const tasks: TaskView[] = [];
    let total = 0;
    for (const [error, row] of rows) {
      if (error || !Array.isArray(row)) continue;
      const [state, msgId, fromId, taskTag, emp, attempt, priority, created] = row as (string | null)[];
      if ((state !== 'waiting' && state !== 'in_progress') || taskTag == null) continue;
      if (tag !== null && taskTag !== tag) continue;
      total++;
      if (tasks.length >= limit) continue;
      tasks.push({
        msg_id: msgId ?? '',
        from_id: fromId ?? '',
        target: anyTargetName(taskTag),
        status: state,
        employee_id: state === 'in_progress' && emp ? emp : null,
        attempt: Number(attempt ?? 0),
        priority: priority === 'high' || priority === 'low' ? priority : 'normal',
        age_ms: Math.max(0, now - Number(created ?? now)),
      });
    }
    return { tags: this.cachedCounts, total, tasks };
  }

  private async readWorkers(ids: readonly string[]): Promise<Map<string, WorkerView>> {
    const views = new Map<string, WorkerView>();
    if (ids.length === 0) return views;
    const pipeline = this.redis.pipeline();
    for (const id of ids) pipeline.hmget(`${this.prefix}emp:${id}`, 'node', 'status', 'capacity', 'inprog');
    const rows = (await pipeline.exec()) ?? [];
    rows.forEach(([error, row], index) => {
      if (error || !Array.isArray(row)) return;
      const [node, status, capacity, inProgress] = row as (string | null)[];
      if (capacity === null) return;
      const online = node !== null && node !== '';
      views.set(ids[index]!, {
        status: online && (status === 'working' || status === 'dnd') ? status : online ? 'idle' : 'offline',
        capacity: Number(capacity),
        in_progress: online ? Number(inProgress ?? 0) : 0,
      });
    });
    return views;
  }

  // ---- stop ----------------------------------------------------------------------------------

  /** A clean stop: this node's employees leave and its in-progress tasks go to the other nodes. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (this.timer) clearInterval(this.timer);
    for (const worker of this.workers.values()) for (const task of worker.tasks.values()) if (task.lease) clearTimeout(task.lease);
    if (this.redis.status === 'ready') await this.reap(this.nodeId, true).catch((error: Error) => this.options.logger.warn('dispatch_handover_failed', { error: error.message }));
    await Promise.all([closeRedis(this.redis), closeRedis(this.sub)]);
  }
}

function eventBase(body: TaskBody): { msg_id: string; from_id: string; target: string; priority: Priority } {
  return { msg_id: body.msg_id, from_id: body.from_id, target: anyTargetName(body.tag), priority: body.priority };
}

function parseBody(text: string): TaskBody | null {
  try {
    const body: unknown = JSON.parse(text);
    if (!isPlainObject(body)) return null;
    const { msg_id, from_id, tag, priority, head, rest, timeout_ms } = body;
    if (typeof msg_id !== 'string' || typeof from_id !== 'string' || typeof tag !== 'string' || typeof head !== 'string' || typeof rest !== 'string') return null;
    if (typeof timeout_ms !== 'number') return null;
    return { msg_id, from_id, tag, priority: priority === 'high' || priority === 'low' ? priority : 'normal', head, rest, timeout_ms };
  } catch {
    return null;
  }
}

/** A script's list (Lua's cjson encodes an empty one as {}). */
function list<T>(value: unknown): T[] {
  return Array.isArray(value) ? (value as T[]) : [];
}

function countsFrom(hash: Record<string, string>): Record<string, TagCounts> {
  const out: Record<string, TagCounts> = {};
  for (const [field, value] of Object.entries(hash)) {
    const count = Number(value);
    if (count <= 0) continue;
    const tag = field.slice(2);
    const counts = (out[tag] ??= { waiting: 0, in_progress: 0 });
    if (field.startsWith('w:')) counts.waiting = count;
    else if (field.startsWith('p:')) counts.in_progress = count;
  }
  return out;
}
