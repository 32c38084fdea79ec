// What a node sends to Redis on the message path (dedupe claims and their outcomes, requests on
// another node's inbox, answers on an asker's reply channel), gathered over one turn of the event
// loop and sent as one pipeline: one write from the node and one read in Redis for the whole
// turn instead of one per command, which is what a message across nodes cost most (syscalls on
// both sides). Publications to one channel in a turn go as a single PUBLISH whose message is a
// JSON array of the items, each item encoded once by its caller. Commands keep the order they
// were given in, within a turn and across turns (one connection, one pipeline after the other).

import type Redis from 'ioredis';
import type { Logger } from './logger';

type Done = (error: Error | null, result: unknown) => void;

interface Command {
  args: (string | number)[];
  done: Done;
}

interface Publication {
  /** Where in the turn's command list its PUBLISH goes: where its first item was given. */
  command: Command;
  items: string[];
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

export class RedisBatch {
  private commands: Command[] = [];
  private publications = new Map<string, Publication>();
  private scheduled = false;

  constructor(
    private readonly redis: Redis,
    private readonly logger: Logger,
  ) {}

  /**
   * SET key value PX ttl NX GET: null when this call set the key, else the value it holds (one
   * round trip claims a key or reads who has it; Redis 7).
   */
  setNxGet(key: string, value: string, ttlMs: number): Promise<string | null> {
    return new Promise((resolve, reject) => {
      this.add({ args: ['set', key, value, 'PX', ttlMs, 'NX', 'GET'], done: (error, result) => (error ? reject(error) : resolve(typeof result === 'string' ? result : null)) });
    });
  }

  /** A command whose answer nobody waits for; a failure is logged under `event`. */
  send(event: string, ...args: (string | number)[]): void {
    this.add({
      args,
      done: (error) => {
        if (error) this.logger.warn(event, { error: error.message });
      },
    });
  }

  /** Adds `item` (JSON text) to this turn's message on `channel`; `heard` gets its receiver count. */
  publish(channel: string, item: string, heard: (receivers: number) => void): void {
    const open = this.publications.get(channel);
    if (open) {
      open.items.push(item);
      open.heard.push(heard);
      return;
    }
    const items = [item];
    const told = [heard];
    const command: Command = {
      args: ['publish', channel],
      done: (error, result) => {
        const receivers = error === null && typeof result === 'number' ? result : 0;
        if (error) this.logger.warn('cluster_publish_failed', { channel, error: error.message });
        for (const tell of told) tell(receivers);
      },
    };
    this.publications.set(channel, { command, items, heard: told });
    this.add(command);
  }

  private add(command: Command): void {
    this.commands.push(command);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }

  private flush(): void {
    this.scheduled = false;
    const commands = this.commands;
    const publications = this.publications;
    this.commands = [];
    this.publications = new Map();
    for (const publication of publications.values()) publication.command.args.push(joinItems(publication.items));
    const pipeline = this.redis.pipeline();
    for (const command of commands) pipeline.call(String(command.args[0]), ...command.args.slice(1));
    pipeline.exec().then(
      (results) => {
        commands.forEach((command, index) => {
          const [error, result] = results?.[index] ?? [new Error('no answer from Redis'), null];
          command.done(error ?? null, result);
        });
      },
      (error: Error) => {
        for (const command of commands) command.done(error, null);
      },
    );
  }
}
