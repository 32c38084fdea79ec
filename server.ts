// The relay's public entry: startRelay(options) runs one relay and returns its handle.
// (Implementation pending: the core is being written now.)

import type { EventBus } from './lib/events';
import type { RelayOptions } from './lib/options';

export type { RelayOptions } from './lib/options';
export type { RelayEvent } from './lib/events';
export * from './lib/protocol';

export interface RelayHandle {
  /** ws://HOST:PORT/ws (loopback address when listening on all interfaces). */
  url: string;
  /** http://HOST:PORT */
  httpUrl: string;
  port: number;
  dataDir: string;
  events: EventBus;
  /** Closes every socket with 1001, finishes pending writes, closes the stores. */
  close(): Promise<void>;
}

export declare function startRelay(options: RelayOptions): Promise<RelayHandle>;
