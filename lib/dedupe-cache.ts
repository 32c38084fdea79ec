// Idempotent send: which log record answered each (sender, msg_id) within the dedupe window, so
// a repeated msg_id gets the first ack again instead of being routed again. Entries live for
// minutes, so each is as small as it can be: the record's slot number in messages.db (the ack
// is rebuilt from the record on a duplicate, which is rare), in a Map per sender, with arrival
// order kept in parallel arrays for expiry and eviction, oldest first.

/** A log slot, or the promise of one while a queued message's writes finish. */
export type Remembered = number | Promise<number>;

export class DedupeCache {
  private readonly bySender = new Map<string, Map<string, Remembered>>();
  private senders: string[] = [];
  private msgIds: string[] = [];
  private times: number[] = [];
  private head = 0;
  private count = 0;

  constructor(
    private readonly windowMs: number,
    private readonly maxEntries: number,
  ) {}

  get size(): number {
    return this.count;
  }

  get enabled(): boolean {
    return this.windowMs > 0 && this.maxEntries > 0;
  }

  find(senderId: string, msgId: string): Remembered | undefined {
    return this.bySender.get(senderId)?.get(msgId);
  }

  remember(senderId: string, msgId: string, at: number, slot: Remembered): void {
    if (!this.enabled) return;
    let ids = this.bySender.get(senderId);
    if (!ids) this.bySender.set(senderId, (ids = new Map()));
    if (ids.has(msgId)) return;
    ids.set(msgId, slot);
    this.count++;
    this.senders.push(senderId);
    this.msgIds.push(msgId);
    this.times.push(at);
    if (this.count > this.maxEntries) this.dropOldest();
    if (typeof slot !== 'number') {
      const map = ids;
      slot.then(
        (settled) => {
          if (map.get(msgId) === slot) map.set(msgId, settled);
        },
        () => {
          if (map.get(msgId) === slot) map.delete(msgId);
        },
      );
    }
  }

  forget(senderId: string, msgId: string): void {
    // The ring entry stays and finds nothing to delete when its turn comes.
    if (this.bySender.get(senderId)?.delete(msgId)) this.count--;
  }

  /** Drops entries older than the window. */
  expire(now: number): void {
    while (this.head < this.times.length && now - this.times[this.head]! > this.windowMs) this.dropOldest();
  }

  private dropOldest(): void {
    if (this.head >= this.times.length) return;
    const sender = this.senders[this.head]!;
    const ids = this.bySender.get(sender);
    if (ids?.delete(this.msgIds[this.head]!)) {
      this.count--;
      if (ids.size === 0) this.bySender.delete(sender);
    }
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.times.length) {
      this.senders = this.senders.slice(this.head);
      this.msgIds = this.msgIds.slice(this.head);
      this.times = this.times.slice(this.head);
      this.head = 0;
    }
  }
}
