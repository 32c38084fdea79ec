// The auth-failure throttle: it answers online guessing of secrets. Someone who can reach the
// relay could otherwise try authkeys, or keys of a known identity id, as fast as the relay
// answers. Only wrong secrets count, per address and per secret guessed at (the authkey, the
// employee key, or the key of one identity), so a malformed or invalid auth never throttles
// anyone, and a client guessing at one identity's key locks out guesses at that key and nothing
// else. Loopback is exempt unless asked: agents on the relay's own host share one address, and
// one misconfigured agent must not lock out the others.

import { isLoopback } from './http-api';

/** What an auth frame guesses at: the relay's authkey, its employee key, or one identity's key. */
export type GuessTarget = 'authkey' | 'employee_key' | `identity:${string}`;

/** Wrong guesses are counted in fixed windows this long, from the first wrong one. */
export const AUTH_FAILURE_WINDOW_MS = 60_000;
/** Most (address, target) counts held; past it the oldest is forgotten, so memory stays bounded. */
const MAX_TRACKED = 100_000;

/** What a node's throttle does when the cluster's count for (address, target) reached the limit. */
export type BlockSink = (address: string, target: GuessTarget, retryAfterMs: number) => void;

/** Wrong guesses counted across nodes (a cluster: lib/redis-throttle.ts); it calls the sink when their count reaches the limit. */
export interface SharedFailureCount {
  attach(limit: number, sink: BlockSink): void;
  /** Resolves once the guess is counted across the nodes. */
  count(address: string, target: GuessTarget): Promise<void>;
}

interface FailureCount {
  count: number;
  since: number;
}

/** The secrets an auth frame presents, each of which a throttle on it refuses. */
export function guessTargets(frame: Record<string, unknown>): GuessTarget[] {
  const targets: GuessTarget[] = [];
  if (presented(frame.authkey)) targets.push('authkey');
  if (presented(frame.employee_key)) targets.push('employee_key');
  const identity = frame.identity;
  if (typeof identity === 'object' && identity !== null && !Array.isArray(identity)) {
    const id = (identity as Record<string, unknown>).id;
    if (typeof id === 'string' && id !== '') targets.push(`identity:${id}`);
  }
  return targets;
}

/** A secret field that was sent at all: a missing or empty one is a mistake, not a guess. */
export function presented(value: unknown): boolean {
  return value !== undefined && value !== null && value !== '';
}

/** Says what was guessed at, for error messages and logs (never the secret itself). */
export function describeTarget(target: GuessTarget): string {
  if (target === 'authkey') return 'the authkey';
  if (target === 'employee_key') return 'the employee key';
  return `the key of identity ${target.slice('identity:'.length, 'identity:'.length + 100)}`;
}

export class AuthThrottle {
  private readonly failures = new Map<string, FailureCount>();
  private shared: SharedFailureCount | null = null;

  /**
   * @param limit wrong guesses per address and target per window before further auths
   *   presenting that target are refused; 0 turns the throttle off.
   * @param throttleLoopback count and refuse loopback addresses too.
   */
  constructor(
    private readonly limit: number,
    private readonly throttleLoopback: boolean,
  ) {}

  private applies(address: string): boolean {
    return this.limit > 0 && (this.throttleLoopback || !isLoopback(address));
  }

  /** The most throttled of `targets` from `address`: ms until it may be tried again, or null. */
  throttled(address: string, targets: readonly GuessTarget[], now: number): { target: GuessTarget; retryAfterMs: number } | null {
    if (targets.length === 0 || !this.applies(address)) return null;
    let worst: { target: GuessTarget; retryAfterMs: number } | null = null;
    for (const target of targets) {
      const failures = this.failures.get(keyOf(address, target));
      if (!failures || failures.count < this.limit) continue;
      const retryAfterMs = AUTH_FAILURE_WINDOW_MS - (now - failures.since);
      if (retryAfterMs > 0 && (worst === null || retryAfterMs > worst.retryAfterMs)) worst = { target, retryAfterMs };
    }
    return worst;
  }

  /** Counts wrong guesses on the other nodes too (only failures reach it), and refuses what their count refuses. */
  share(shared: SharedFailureCount): void {
    this.shared = shared;
    shared.attach(this.limit, (address, target, retryAfterMs) => this.block(address, target, retryAfterMs, Date.now()));
  }

  /** The cluster reached the limit for (address, target): refused here for `retryAfterMs`. */
  block(address: string, target: GuessTarget, retryAfterMs: number, now: number): void {
    if (!this.applies(address)) return;
    const key = keyOf(address, target);
    const since = now - (AUTH_FAILURE_WINDOW_MS - retryAfterMs);
    const failures = this.failures.get(key);
    if (failures && failures.count >= this.limit && failures.since >= since) return;
    this.failures.delete(key);
    if (this.failures.size >= MAX_TRACKED) this.failures.delete(this.failures.keys().next().value!);
    this.failures.set(key, { count: this.limit, since });
  }

  /** Counts one wrong guess on the other nodes' side too; undefined without them (or when the throttle does not apply). */
  countShared(address: string, target: GuessTarget): Promise<void> | undefined {
    return this.shared !== null && this.applies(address) ? this.shared.count(address, target) : undefined;
  }

  /** Counts one wrong guess at `target`; true when this one reached the limit. */
  countWrong(address: string, target: GuessTarget, now: number): boolean {
    if (!this.applies(address)) return false;
    const key = keyOf(address, target);
    const failures = this.failures.get(key);
    if (failures && now - failures.since < AUTH_FAILURE_WINDOW_MS) {
      failures.count++;
      return failures.count === this.limit;
    }
    // A new window goes to the back of the map, which is kept in window order for eviction.
    this.failures.delete(key);
    if (this.failures.size >= MAX_TRACKED) this.failures.delete(this.failures.keys().next().value!);
    this.failures.set(key, { count: 1, since: now });
    return this.limit === 1;
  }

  /** Forgets windows that are over. */
  sweep(now: number): void {
    for (const [key, failures] of this.failures) {
      if (now - failures.since < AUTH_FAILURE_WINDOW_MS) break;
      this.failures.delete(key);
    }
  }
}

function keyOf(address: string, target: GuessTarget): string {
  return `${address}\n${target}`;
}
