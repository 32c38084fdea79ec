// The seam between routing and dispatch (PROTOCOL.md part C). The router and the HTTP API see
// only TaskDispatch; server.ts picks the implementation once: Dispatcher (lib/dispatch.ts: one
// node, in memory and tasks.db, every call synchronous) or ClusterDispatch
// (lib/redis-dispatch.ts: the shared task state in Redis, see docs/CLUSTER.md).

import type { Identity } from './identity-store';
import type { EmployeeStatus } from './protocol';
import type { SubmitInput, SubmitResult, TagCounts, TaskView, WorkerView } from './dispatch';

/** What /api/admin/tasks lists. */
export interface TaskList {
  total: number;
  tasks: TaskView[];
}

/** Reads that must ask the shared store (a cluster); a single node answers them from memory. */
export interface SharedDispatchReads {
  /** Waiting and in-progress tasks of the whole cluster, with counts per tag. */
  tasks(now: number, limit: number, tag: string | null): Promise<TaskList & { tags: Record<string, TagCounts> }>;
  /** The availability of these employees, wherever they are connected. */
  workers(ids: readonly string[]): Promise<Map<string, WorkerView>>;
}

export interface TaskDispatch {
  /** An employee authenticated on this node. */
  online(identity: Identity, capacity: number | undefined): void;
  /** An employee's connection on this node ended. */
  offline(id: string): void;
  /** A status frame from an employee of this node: what now holds (answered at once). */
  setStatus(identity: Identity, status: EmployeeStatus | undefined, capacity: number | undefined): WorkerView;
  /** A task for `any:<tag>`: synchronous on one node; a cluster asks the shared store first. */
  submit(input: SubmitInput): SubmitResult | Promise<SubmitResult>;
  /** A message from an employee with in_reply_to. */
  replied(employeeId: string, inReplyTo: string, toIds: readonly string[]): void;
  /** task_done from an employee of this node: false when it holds no such task. */
  taskDone(employeeId: string, msgId: string, failed: boolean): boolean;
  workerOf(id: string): WorkerView | null;
  /** Waiting and in-progress counts per tag (a cluster: as of its last look at the store). */
  counts(): Record<string, TagCounts>;
  list(now: number, limit: number, tag: string | null): TaskList;
  /** Set in a cluster: the admin reads then ask the shared store. */
  readonly shared?: SharedDispatchReads;
  /** Waiting tasks past their deadline (the relay's once-a-second timer). */
  expire(now: number): void;
  close(): void | Promise<void>;
}
