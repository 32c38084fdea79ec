// Socket writes made while one batch of input is processed go out together. The first write a
// socket gets in a tick goes straight out, so a broadcast reaches its first receivers while the
// relay is still writing to the rest; from the second write on the socket is corked until the
// end of the tick, so the acks for the many frames one read from a sender held leave in one
// writev instead of one syscall each.

import type { Duplex } from 'node:stream';

export interface Corkable {
  /** The underlying socket, corked from its second write in a tick until the tick ends. */
  readonly socket: Duplex | undefined;
  corked: boolean;
  /** The tick of this socket's last write (WriteBatch's count). */
  writtenInTick: number;
}

export class WriteBatch {
  private held: Corkable[] = [];
  private tick = 1;
  private tickEndPending = false;
  private readonly endTick = () => {
    this.tickEndPending = false;
    this.tick++;
    const held = this.held;
    this.held = [];
    for (const item of held) {
      item.corked = false;
      item.socket?.uncork();
    }
  };

  /** Call before each write to the socket: corks it from its second write in this tick on. */
  hold(item: Corkable): void {
    if (item.corked || !item.socket) return;
    if (!this.tickEndPending) {
      this.tickEndPending = true;
      process.nextTick(this.endTick);
    }
    if (item.writtenInTick !== this.tick) {
      item.writtenInTick = this.tick;
      return;
    }
    item.corked = true;
    item.socket.cork();
    this.held.push(item);
  }
}
