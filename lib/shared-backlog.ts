// Cluster: the backlogs of queued copies a node is writing from the cluster store to sessions it
// holds. While a session has one, a new message to it that may be queued goes behind it (queued
// in the store, after the copies already there) instead of being written at once, so queued
// messages arrive in send order as on one node. A message that may not be queued is written at
// once, as on one node.
//
// A backlog starts with a drain and ends when a drain finds nothing left in the store. Copies
// sent behind it are stored by their sender's node a moment later; until their wake ("queued"
// announcement) has come, a drain that finds the store empty does not end the backlog (a newer
// message could otherwise overtake a copy still on its way), up to BEHIND_WAIT_MS (a sender's
// store that failed never announces anything).

/** How long a backlog waits for copies sent behind it to be announced before it may end without them. */
export const BEHIND_WAIT_MS = 3000;

interface Backlog {
  /** Copies sent behind the backlog whose wake has not come yet. */
  expected: number;
  /** When the copies still expected are given up on. */
  expectUntil: number;
  timer: NodeJS.Timeout | null;
}

/** Keyed by whatever the caller holds a session as (the router: its Session). */
export class SharedBacklogs<S extends object> {
  private readonly backlogs = new Map<S, Backlog>();

  /** `drainAgain` runs a drain once copies given up on are due (it ends the backlog if none came). */
  constructor(private readonly drainAgain: (session: S) => void) {}

  /** Whether a new message that may be queued must go behind this session's backlog. */
  has(session: S): boolean {
    return this.backlogs.has(session);
  }

  /** A drain starts: the session has a backlog until a drain finds nothing left. */
  begin(session: S): void {
    if (!this.backlogs.has(session)) this.backlogs.set(session, { expected: 0, expectUntil: 0, timer: null });
  }

  /** A copy for the session was sent behind its backlog, to be stored by its sender's node. */
  sentBehind(session: S, now: number): void {
    this.begin(session);
    const backlog = this.backlogs.get(session)!;
    backlog.expected++;
    backlog.expectUntil = now + BEHIND_WAIT_MS;
  }

  /** Queued copies for the session were announced (a wake). */
  announced(session: S): void {
    const backlog = this.backlogs.get(session);
    if (backlog && backlog.expected > 0) backlog.expected--;
  }

  /** A drain found nothing left: the backlog ends, unless copies sent behind it are still on their way. */
  drained(session: S, now: number): void {
    const backlog = this.backlogs.get(session);
    if (backlog === undefined) return;
    if (backlog.expected > 0 && now < backlog.expectUntil) {
      backlog.timer ??= setTimeout(() => {
        backlog.timer = null;
        this.drainAgain(session);
      }, backlog.expectUntil - now);
      backlog.timer.unref();
      return;
    }
    this.end(session);
  }

  /** The session is gone (or its drain failed): it has no backlog any more. */
  end(session: S): void {
    const backlog = this.backlogs.get(session);
    if (backlog === undefined) return;
    if (backlog.timer) clearTimeout(backlog.timer);
    this.backlogs.delete(session);
  }
}
