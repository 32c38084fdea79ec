// What a node sends to Redis on the message path (dedupe claims and their outcomes, requests on
// another node's inbox, answers on an asker's reply channel), gathered over one turn of the event
// loop and sent as ONE script call: one write from the node, one command in Redis and one reply
// for the whole turn. One command per message operation cost most of a message across nodes:
// a syscall and a parse on both sides, and ioredis's own work per command (several times what
// the whole turn's script call costs per operation). Publications to one channel in a turn go as
// a single PUBLISH whose message is a JSON array of the items, each item encoded once by its
// caller. Operations run in the order they were given, within a turn and across turns (one
// connection, one script call after the other), and each turn's run is atomic.

import type Redis from 'ioredis';
import type { Logger } from './logger';

/**
 * Runs a turn's operations in order. ARGV[1] names them, one letter each (read as its byte:
 * c 99, s 115, d 100, p 112); keys come from KEYS
 * in order, values from ARGV after the first:
 *   c  claim:   SET key 'pending' PX <ttl> NX GET   (ARGV: ttl)   -> 0 when set, else the value held
 *   s  settle:  SET key <value> KEEPTTL XX          (ARGV: value) -> 0
 *   d  delete:  DEL key                                           -> 0
 *   p  publish: PUBLISH <channel> <message>         (ARGV: channel, message; no key) -> receivers
 */
export const BATCH_SCRIPT = `
local ops = ARGV[1]
local out = {}
local k = 0
local a = 1
for i = 1, #ops do
  local op = string.byte(ops, i)
  if op == 99 then
    k = k + 1
    a = a + 1
    out[i] = redis.call('SET', KEYS[k], 'pending', 'PX', ARGV[a], 'NX', 'GET') or 0
  elseif op == 115 then
    k = k + 1
    a = a + 1
    redis.call('SET', KEYS[k], ARGV[a], 'KEEPTTL', 'XX')
    out[i] = 0
  elseif op == 100 then
    k = k + 1
    redis.call('DEL', KEYS[k])
    out[i] = 0
  elseif op == 112 then
    a = a + 2
    out[i] = redis.call('PUBLISH', ARGV[a - 1], ARGV[a])
  else
    return redis.error_reply('unknown batch operation ' .. string.char(op))
  end
end
return out
`;

const SCRIPT_NAME = 'mimiclawBatch';
/** The longest a settle waits for the next script call before it is sent alone. */
const SETTLE_DELAY_MS = 2;
/** At most this many operations go in one script call (a turn with more makes several). */
const MAX_OPERATIONS_PER_CALL = 1000;

type Done = (error: Error | null, result: unknown) => void;

interface Operation {
  op: 'c' | 's' | 'd' | 'p';
  key: string | null;
  values: string[];
  done: Done;
}

interface Publication {
  operation: Operation;
  items: string[];
  /** The items frame themselves (lib/redis-inbox.ts): the message is their concatenation, not a JSON array. */
  framed: boolean;
  /** Each item's caller hears how many subscribers received the message (0 when it failed). */
  heard: ((receivers: number) => void)[];
}

/** A channel's message as the batch sends it: the items as one JSON array, none re-encoded. */
export function joinItems(items: readonly string[]): string {
  return `[${items.join(',')}]`;
}

/** The items of a batched channel message; a message that is not an array is one item. */
export function splitItems(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [value];
}

type ScriptCaller = (numKeys: number, ...args: string[]) => Promise<unknown>;

export class RedisBatch {
  private operations: Operation[] = [];
  private publications = new Map<string, Publication>();
  private scheduled = false;
  /** Settles wait this long for a call to ride with (lib: settle). */
  private lingering: NodeJS.Timeout | null = null;
  private readonly run: ScriptCaller;

  constructor(
    redis: Redis,
    private readonly logger: Logger,
  ) {
    // EVALSHA, and EVAL when Redis does not know the script yet (a restarted Redis).
    if (!(SCRIPT_NAME in redis)) redis.defineCommand(SCRIPT_NAME, { lua: BATCH_SCRIPT });
    const caller = (redis as unknown as Record<string, ScriptCaller>)[SCRIPT_NAME]!;
    this.run = (numKeys, ...args) => caller.call(redis, numKeys, ...args);
  }

  /** SET key 'pending' PX ttl NX GET: null when this call set the key, else the value it holds. */
  claim(key: string, ttlMs: number): Promise<string | null> {
    return new Promise((resolve, reject) => {
      this.add({ op: 'c', key, values: [String(ttlMs)], done: (error, result) => (error ? reject(error) : resolve(typeof result === 'string' ? result : null)) });
    });
  }

  /**
   * SET key value KEEPTTL XX; a failure is logged under `event`. Nobody waits for it, so it does
   * not call Redis by itself: it rides with the next call (the next messages' claims and
   * requests), and at the latest after SETTLE_DELAY_MS. A resend meanwhile finds the claim still
   * pending and waits for it (lib/redis-dedupe.ts), as it would while the route was running.
   */
  settle(key: string, value: string, event: string): void {
    this.operations.push({ op: 's', key, values: [value], done: this.logFailure(event) });
    if (this.scheduled || this.lingering !== null) return;
    this.lingering = setTimeout(() => {
      this.lingering = null;
      if (!this.scheduled) this.flush();
    }, SETTLE_DELAY_MS);
  }

  /** DEL key; a failure is logged under `event`. */
  delete(key: string, event: string): void {
    this.add({ op: 'd', key, values: [], done: this.logFailure(event) });
  }

  /**
   * Adds `item` (JSON text) to this turn's message on `channel`; `heard` gets its receiver count.
   * `framed`: the item frames itself and the message is the items concatenated (one channel is
   * always published the same way).
   */
  publish(channel: string, item: string, heard: (receivers: number) => void, framed = false): void {
    const open = this.publications.get(channel);
    if (open) {
      open.items.push(item);
      open.heard.push(heard);
      return;
    }
    const items = [item];
    const told = [heard];
    const operation: Operation = {
      op: 'p',
      key: null,
      values: [channel],
      done: (error, result) => {
        const receivers = error === null && typeof result === 'number' ? result : 0;
        if (error) this.logger.warn('cluster_publish_failed', { channel, error: error.message });
        for (const tell of told) tell(receivers);
      },
    };
    this.publications.set(channel, { operation, items, framed, heard: told });
    this.add(operation);
  }

  private logFailure(event: string): Done {
    return (error) => {
      if (error) this.logger.warn(event, { error: error.message });
    };
  }

  private add(operation: Operation): void {
    this.operations.push(operation);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }

  private flush(): void {
    this.scheduled = false;
    if (this.lingering !== null) {
      clearTimeout(this.lingering);
      this.lingering = null;
    }
    const operations = this.operations;
    const publications = this.publications;
    this.operations = [];
    this.publications = new Map();
    for (const publication of publications.values()) publication.operation.values.push(publication.framed ? publication.items.join('') : joinItems(publication.items));
    // Bounded argument lists; the calls still go out in order on the one connection.
    for (let start = 0; start < operations.length; start += MAX_OPERATIONS_PER_CALL) this.send(operations.slice(start, start + MAX_OPERATIONS_PER_CALL));
  }

  private send(operations: Operation[]): void {
    let ops = '';
    const keys: string[] = [];
    const values: string[] = [];
    for (const operation of operations) {
      ops += operation.op;
      if (operation.key !== null) keys.push(operation.key);
      for (const value of operation.values) values.push(value);
    }
    this.run(keys.length, ...keys, ops, ...values).then(
      (results) => {
        const list = Array.isArray(results) ? (results as unknown[]) : [];
        operations.forEach((operation, index) => operation.done(null, list[index]));
      },
      (error: Error) => {
        for (const operation of operations) operation.done(error, null);
      },
    );
  }
}
