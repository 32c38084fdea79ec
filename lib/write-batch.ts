// Socket writes made while one batch of input is processed go out together: a socket written
// to is corked until the end of the current tick, so the acks for the many frames one read
// from a sender held leave in one writev instead of one syscall each.

import type { Duplex } from 'node:stream';

export interface Corkable {
  /** The underlying socket, corked until flush(). */
  readonly socket: Duplex | undefined;
  corked: boolean;
}

export class WriteBatch {
  private held: Corkable[] = [];
  private readonly flush = () => {
    const held = this.held;
    this.held = [];
    for (const item of held) {
      item.corked = false;
      item.socket?.uncork();
    }
  };

  /** Corks the socket for the rest of this tick (once per tick per socket). */
  hold(item: Corkable): void {
    if (item.corked || !item.socket) return;
    item.corked = true;
    item.socket.cork();
    if (this.held.push(item) === 1) process.nextTick(this.flush);
  }
}
