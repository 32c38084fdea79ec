// /api/events on a cluster node: a reader's stream is answered only once this node hears the
// other nodes' events (subscribed, and every node told to publish), so whatever happens on any
// node after the stream has opened is in it, as on a single relay. Without this a reader would
// miss the other nodes' events for up to two heartbeats: the node subscribed at its next
// heartbeat, and nodes that had found no listener paused publishing for one.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { EventStream } from './event-stream';

/** The cluster side: subscribe to the shared events now and announce a reader. */
export interface SharedEventsChannel {
  listenToEventsNow(): Promise<void>;
}

/** How long a reader waits for the subscription; past it (store down) it gets this node's events. */
const LISTEN_TIMEOUT_MS = 2000;

export class ClusterEventReaders {
  /** Readers whose stream waits for the subscription: they count as readers already. */
  private arriving = 0;

  constructor(
    private readonly channel: SharedEventsChannel,
    private readonly stream: EventStream,
  ) {}

  /** Whether this node should stay subscribed to the shared events. */
  wanted(): boolean {
    return this.arriving > 0 || this.stream.clientCount > 0;
  }

  /** Serves GET /api/events once the other nodes' events reach this node. */
  handle(req: IncomingMessage, res: ServerResponse): void {
    this.arriving++;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, LISTEN_TIMEOUT_MS);
      timer.unref();
    });
    // A store that cannot be reached still leaves this node's own events to stream; the
    // heartbeat subscribes once it is back.
    const listening = this.channel.listenToEventsNow().catch(() => undefined);
    void Promise.race([listening, timedOut]).then(() => {
      clearTimeout(timer);
      this.arriving--;
      if (res.destroyed || req.socket.destroyed) return;
      this.stream.handle(req, res);
    });
  }
}
