// Orders the sessions of one identity across nodes. Each join in the cluster store gets a token
// that grows with every join (JOIN_SCRIPT in lib/redis-scripts.ts), and every replace
// announcement carries it. An announcement can reach a node late: after that node's own,
// newer session of the identity has gone online (its join still on the way to Redis), or after
// a newer announcement from a third node. Comparing tokens tells an older session's
// announcement from a newer one's, so a late announcement neither closes the newer session nor
// points the presence mirror back at the older node.

/** One join of an identity on this node: its token once the cluster store has answered. */
export interface JoinAttempt {
  /** 0 until the join's token is known. */
  token: number;
  /** The newest token another node announced for the identity while this join was on its way. */
  newestElsewhere: number;
}

/** What to do with a replace announcement from another node. */
export interface AnnouncementVerdict {
  /** The announcement is newer than what the presence mirror knows: move the mirror to its node. */
  moveMirror: boolean;
  /** The session held here is older than the announced one: close it (4000). */
  closeHeld: boolean;
}

export class PresenceOrder {
  /** Identities whose session this node holds, by their current join. */
  private readonly held = new Map<string, JoinAttempt>();
  /** The newest token the mirror has seen per identity (kept after a leave, so a late announcement cannot bring it back). */
  private readonly mirrorTokens = new Map<string, number>();

  /** This node starts a join of `id` (a newer one replaces any earlier join of `id` here). */
  joining(id: string): JoinAttempt {
    const attempt: JoinAttempt = { token: 0, newestElsewhere: 0 };
    this.held.set(id, attempt);
    return attempt;
  }

  /**
   * The cluster store answered `attempt` with `token`. 'current': the session stands (the mirror
   * may point here); 'replaced': a newer session elsewhere was announced meanwhile; 'stale': a
   * later join of this node superseded it.
   */
  joinedAs(id: string, attempt: JoinAttempt, token: number): 'current' | 'replaced' | 'stale' {
    attempt.token = token;
    if (this.held.get(id) !== attempt) return 'stale';
    this.noteMirror(id, token);
    return attempt.newestElsewhere > token ? 'replaced' : 'current';
  }

  /** A join that did not reach the store: nothing of it is held here any more. */
  failed(id: string, attempt: JoinAttempt): void {
    if (this.held.get(id) === attempt) this.held.delete(id);
  }

  /** This node no longer holds `id`'s session; the token of the join it had, if known. */
  left(id: string): number | undefined {
    const attempt = this.held.get(id);
    this.held.delete(id);
    return attempt?.token || undefined;
  }

  /** The token of the session of `id` held here, if its join has been answered. */
  heldToken(id: string): number | undefined {
    return this.held.get(id)?.token || undefined;
  }

  /**
   * A replace announcement from another node. An announcement without a token (from a node
   * that predates tokens) counts as the newest, as before tokens.
   */
  announcedElsewhere(id: string, token: number | undefined): AnnouncementVerdict {
    const moveMirror = token === undefined || this.noteMirror(id, token);
    const attempt = this.held.get(id);
    if (attempt === undefined) return { moveMirror, closeHeld: false };
    if (token === undefined) return { moveMirror, closeHeld: true };
    if (attempt.token === 0) {
      // This node's own join is still on its way: whether the session is older is known only
      // when the store answers it (joinedAs).
      attempt.newestElsewhere = Math.max(attempt.newestElsewhere, token);
      return { moveMirror, closeHeld: false };
    }
    return { moveMirror, closeHeld: token > attempt.token };
  }

  /** This node's own announcement, heard back on the channel: whether the mirror may point here. */
  announcedHere(id: string, token: number | undefined): boolean {
    return token === undefined || this.noteMirror(id, token);
  }

  /** A leave announcement: whether the mirror entry for its node may go (not when a newer join was seen). */
  leftElsewhere(id: string, token: number | undefined): boolean {
    const known = this.mirrorTokens.get(id);
    return token === undefined || known === undefined || token >= known;
  }

  /** Records `token` for the mirror; true when it is the newest seen for `id`. */
  private noteMirror(id: string, token: number): boolean {
    const known = this.mirrorTokens.get(id);
    if (known !== undefined && known >= token) return false;
    this.mirrorTokens.set(id, token);
    return true;
  }
}
