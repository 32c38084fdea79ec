// The seam between the router and whatever else shares the relay: other nodes. The router asks
// a ClusterLink only about what its own sockets and replica cannot answer (a target it does not
// hold, an id it does not know, a msg_id another node may have seen), and the link calls back
// through ClusterHandlers for what other nodes ask of this one. server.ts picks the
// implementation: SingleNode (nothing elsewhere) or RedisCluster (docs/CLUSTER.md).

import type { NewQueuedEntry } from './delivery-queue';
import type { Identity } from './identity-store';

/**
 * A target's outcome on the node that holds (or held) its socket. 'backlog': the message may be
 * queued and the holder is writing the target's queued copies: the asking node queues it behind them.
 */
export type RemoteOutcome = 'delivered' | 'offline' | 'slow' | 'banned' | 'backlog';

/** A forwarded message as its head and tail: the frame for a target is head + target id + tail. */
export interface FramePieces {
  head: string;
  tail: string;
  /** The message may be queued: a target with queued copies still to write gets it behind them. */
  queueable?: boolean;
}

/** A queued copy as stored outside this node: the entry plus the node whose log holds its record. */
export interface SharedQueuedEntry extends NewQueuedEntry {
  origin: string;
}

/** A queued copy's end, reported to the node whose log has its record and to its sender. */
export interface QueuedOutcome {
  origin: string;
  record_id: string;
  msg_id: string;
  from_id: string;
  target_id: string;
  status: 'delivered' | 'expired';
}

/** What the dedupe window says about a (sender, msg_id) a node has not seen itself. */
export type DedupeClaim =
  | { kind: 'new' }
  /** Routed before (on any node): the first ack's outcome fields. */
  | { kind: 'seen'; outcome: string };

/** What other nodes ask of this one; the router implements it. */
export interface ClusterHandlers {
  /** Write the frame to the sockets of `ids` held here; each id's outcome. */
  deliverHere(pieces: FramePieces, ids: readonly string[]): Record<string, RemoteOutcome>;
  /** Write the frame to every socket held here except the sender's; the ids written to. */
  broadcastHere(pieces: FramePieces, senderId: string): string[];
  /** Another node took this identity's session: close the one held here with 4000. */
  replacedElsewhere(id: string): void;
  /** A node wrote an identity (its `banned` is not part of the document: see banChanged). */
  identityWritten(doc: Record<string, unknown>): void;
  /** A node banned or unbanned an identity: close the socket held here with 4008 on a ban. */
  banChanged(id: string, banned: boolean, by: string): void;
  /** A node removed this identity from the cluster: close the session held here with 4010 and forget it. */
  identityRemoved(id: string, by: string): void;
  /** A node gave this identity a new key (the replica has its hash already): close the session held here with 4009. */
  keyRotatedElsewhere(id: string, by: string): void;
  /** Queued copies for a target held here may be waiting: deliver them. */
  queuedFor(id: string): void;
  /** Every identity whose session this node holds (re-announced after the store comes back). */
  heldIds(): Iterable<string>;
  /** Liveness of the identities held here that were active since the last call: [id, lastSeen, lastHeartbeatAt]. */
  recentlySeen(): [string, number, number | null][];
  /** Liveness another node reported for identities it holds. */
  seenElsewhere(seen: readonly [string, number, number | null][]): void;
  /** A queued copy sent by a sender of this node (or to a sender held here) was delivered or expired. */
  queuedOutcome(outcome: QueuedOutcome): void;
}

export interface ClusterLink {
  readonly nodeId: string;
  /** False on a single node: the router then never calls the methods below marked "cluster". */
  readonly clustered: boolean;
  attach(handlers: ClusterHandlers): void;
  /** Whether the shared store answers now; when not, what needs it fails with cluster_unavailable. */
  readonly available: boolean;

  // ---- cluster ----
  /** The node holding `id`'s session as this node last heard (a mirror of the shared presence), if any. */
  locate(id: string): string | undefined;
  /** Identities online on any node, as the presence mirror has them (this node's included). */
  onlineIds(): Iterable<string>;
  /** How many identities are online on all nodes together (the presence mirror's size). */
  onlineCount(): number;
  /**
   * This node now holds `id`'s session: record it and close any older one elsewhere (4000).
   * False when the relay already holds `maxSessions` sessions (and this one replaces none): nothing is recorded.
   */
  joined(id: string, maxSessions: number): Promise<boolean>;
  /** This node no longer holds `id`'s session (only removes the presence that names this node). */
  left(id: string): void;
  /** An identity this node's replica does not know, read from the shared store. */
  fetchIdentity(id: string): Promise<Identity | undefined>;
  /** Sets the ban in the shared store and tells the node holding the identity. */
  setBanned(identity: Identity, banned: boolean, by: string): Promise<void>;
  /**
   * Removes the identity, its ban and its queued copies from the shared store and tells every
   * node (the holder closes the session with 4010). The holder as the shared presence named it
   * and the dropped copies; null when another node removed it first or, with `onlyOffline`
   * (pruning), when it is online on some node.
   */
  removeIdentity(id: string, by: string, onlyOffline: boolean): Promise<{ holder: string | null; dropped: SharedQueuedEntry[] } | null>;
  /** Tells every node the identity's key changed (written already); the node holding its session, if any. */
  keyRotated(id: string, by: string): Promise<string | null>;
  /** Delivers to targets not held here; each id's outcome ('offline' when no node answered in time). */
  deliverElsewhere(pieces: FramePieces, ids: readonly string[]): Promise<Record<string, RemoteOutcome>>;
  /** Broadcast on every other live node; the ids written to. */
  broadcastElsewhere(pieces: FramePieces, senderId: string): Promise<string[]>;
  /** Stores queued copies in the shared store, in order (oldest past --max-queued expire). */
  enqueue(entries: readonly NewQueuedEntry[]): Promise<void>;
  /** Tells the nodes holding these targets (if any) that queued copies wait for them. */
  wake(ids: readonly string[]): void;
  /** Takes every queued copy for `id` out of the shared store, in send order. */
  takeQueued(id: string): Promise<SharedQueuedEntry[]>;
  /** Puts copies that could not be written back at the head of the target's queue. */
  returnQueued(id: string, entries: readonly SharedQueuedEntry[]): Promise<void>;
  /** Reports a queued copy's end to its origin node and its sender's node. */
  finishQueued(outcome: QueuedOutcome): void;
  /** Claims (sender, msg_id) for the dedupe window, or returns the first ack's outcome. */
  claimMsgId(senderId: string, msgId: string): Promise<DedupeClaim>;
  /** Records the ack's outcome for a claimed (sender, msg_id). */
  settleMsgId(senderId: string, msgId: string, outcome: string): void;
  /** Releases a claim whose message was not routed (a store failure). */
  releaseMsgId(senderId: string, msgId: string): void;

  close(): Promise<void>;
}
