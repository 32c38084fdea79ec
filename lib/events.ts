// The relay's internal event bus. The router and the HTTP API publish; the SSE stream, the
// metrics and the logger subscribe. Publishing is synchronous and cheap: a subscriber that
// needs to do slow work must buffer it itself, so a slow consumer never slows routing.

import type { FailureReason, Priority, Role } from './protocol';

export interface NodeRef {
  id: string;
  role: Role;
  name: string | null;
  tags: string[];
}

export type RelayEvent =
  /** `relay_node`: the relay node that holds the new socket (docs/CLUSTER.md); `credential`: for a boss, the name of the credential it presented ("authkey" or a --boss-keys-file name). */
  | { type: 'connect'; node: NodeRef; reconnected: boolean; relay_node?: string; at: number; credential?: string }
  | { type: 'disconnect'; node: NodeRef; code: number; at: number }
  | { type: 'auth_fail'; code: string; role: string | null; at: number }
  | {
      type: 'message';
      msg_id: string;
      from: NodeRef;
      /** The requested `to`, as the sender wrote it. */
      to: string | string[];
      delivered: string[];
      failed: { id: string; reason: FailureReason }[];
      queued: string[];
      bytes: number;
      /** Time spent routing, from frame receipt to the last write, in milliseconds (fractional). */
      route_ms: number;
      at: number;
    }
  | { type: 'delivery_update'; msg_id: string; from_id: string; id: string; status: 'delivered' | 'expired'; at: number }
  | { type: 'ban'; node: NodeRef; by: string; at: number }
  | { type: 'unban'; node: NodeRef; by: string; at: number }
  | { type: 'health'; node: NodeRef; valid: boolean; at: number }
  /** `dropped`: messages that were queued for it. */
  | { type: 'identity_removed'; node: NodeRef; by: string; reason: 'deleted' | 'forgotten' | 'ephemeral'; dropped: number; at: number }
  | { type: 'key_rotated'; node: NodeRef; by: string; at: number }
  | { type: 'frame_error'; code: string; at: number }
  // Part C: an employee declared its status or capacity (a status frame).
  | { type: 'availability'; node: NodeRef; status: 'idle' | 'working' | 'dnd'; capacity: number; in_progress: number; at: number }
  // Part C: a task sent to `any:<tag>` (target) was handed out, answered, sent back or given up.
  | { type: 'task_assigned'; msg_id: string; from_id: string; target: string; priority: Priority; employee_id: string; attempt: number; wait_ms: number; at: number }
  | { type: 'task_done'; msg_id: string; from_id: string; target: string; priority: Priority; employee_id: string; attempt: number; at: number }
  | {
      type: 'task_retried';
      msg_id: string;
      from_id: string;
      target: string;
      priority: Priority;
      /** Who lost the lease (null after a restart). */
      employee_id: string | null;
      attempt: number;
      reason: 'timeout' | 'disconnected' | 'failed' | 'restart';
      at: number;
    }
  | { type: 'task_failed'; msg_id: string; from_id: string; target: string; priority: Priority; attempt: number; reason: 'max_attempts' | 'expired'; at: number };

export type RelayEventType = RelayEvent['type'];
export type RelayEventListener = (event: RelayEvent) => void;

export class EventBus {
  private readonly listeners = new Set<RelayEventListener>();

  subscribe(listener: RelayEventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get hasListeners(): boolean {
    return this.listeners.size > 0;
  }

  publish(event: RelayEvent): void {
    for (const listener of this.listeners) listener(event);
  }
}
