// The in-memory index of messages.db: one slot per record (file offset and length of its
// latest version, timestamp) and one edge per boss<->employee pair of a record. Columns are
// typed arrays and ids are interned, so a million records cost tens of megabytes, not the
// records themselves; queries scan the edges and read only the page's lines from the file.

import type { Role } from './protocol';

class Column<T extends Float64Array | Uint32Array | Int32Array> {
  length = 0;
  constructor(
    public data: T,
    private readonly make: (size: number) => T,
  ) {}

  push(value: number): void {
    if (this.length === this.data.length) {
      const bigger = this.make(Math.max(1024, this.data.length * 2));
      bigger.set(this.data);
      this.data = bigger;
    }
    this.data[this.length++] = value;
  }

  /** Drops the first `count` entries. */
  dropFront(count: number): void {
    this.data.copyWithin(0, count, this.length);
    this.length -= count;
  }
}

const f64 = () => new Column(new Float64Array(1024), (n) => new Float64Array(n));
const u32 = () => new Column(new Uint32Array(1024), (n) => new Uint32Array(n));
const i32 = () => new Column(new Int32Array(1024), (n) => new Int32Array(n));

export interface EdgeFilter {
  bossId?: string;
  employeeId?: string;
  employeeIds?: ReadonlySet<string>;
  since?: number;
  until?: number;
  offset: number;
  limit: number;
}

export interface EdgeHit {
  slot: number;
  /** Index of the target inside the record's targets. */
  target: number;
}

/** A target's role from its id (PROTOCOL.md: ids are `boss-…` / `employee-…`); null for any other id. */
export function roleFromId(id: string): Role | null {
  return id.startsWith('employee-') ? 'employee' : id.startsWith('boss-') ? 'boss' : null;
}

type TargetList = readonly (string | { readonly id: string })[];

export class MessageIndex {
  private readonly ids = new Map<string, number>();
  private readonly slotOffset = f64();
  private readonly slotLength = u32();
  private readonly slotTime = f64();
  private readonly edgeSlot = u32();
  private readonly edgeTarget = u32();
  private readonly edgeBoss = i32();
  private readonly edgeEmployee = i32();
  /** Slots dropped from the front since start: external slot numbers stay stable. */
  private base = 0;

  get size(): number {
    return this.slotTime.length;
  }

  get firstSlot(): number {
    return this.base;
  }

  get nextSlot(): number {
    return this.base + this.slotTime.length;
  }

  private intern(id: string): number {
    let index = this.ids.get(id);
    if (index === undefined) {
      index = this.ids.size;
      this.ids.set(id, index);
    }
    return index;
  }

  /**
   * Adds a record; returns its slot. Its targets come as lists (an ack's delivered, failed and
   * queued, or a record's targets); a target's index counts through the lists in order.
   */
  add(offset: number, length: number, timestamp: number, fromId: string, fromRole: Role, ...targetLists: TargetList[]): number {
    const slot = this.nextSlot;
    this.slotOffset.push(offset);
    this.slotLength.push(length);
    this.slotTime.push(timestamp);
    const from = this.intern(fromId);
    let index = 0;
    for (const list of targetLists) {
      for (let i = 0; i < list.length; i++, index++) {
        const target = list[i]!;
        const id = typeof target === 'string' ? target : target.id;
        const role = roleFromId(id);
        if (role === null || role === fromRole) continue;
        const other = this.intern(id);
        this.edgeSlot.push(slot);
        this.edgeTarget.push(index);
        this.edgeBoss.push(fromRole === 'boss' ? from : other);
        this.edgeEmployee.push(fromRole === 'boss' ? other : from);
      }
    }
    return slot;
  }

  /** Points a slot at a newer version of its record. */
  move(slot: number, offset: number, length: number): void {
    const at = slot - this.base;
    if (at < 0 || at >= this.slotTime.length) return;
    this.slotOffset.data[at] = offset;
    this.slotLength.data[at] = length;
  }

  location(slot: number): { offset: number; length: number } | null {
    const at = slot - this.base;
    if (at < 0 || at >= this.slotTime.length) return null;
    return { offset: this.slotOffset.data[at]!, length: this.slotLength.data[at]! };
  }

  /** Matching edges newest first: the page and the total. */
  query(filter: EdgeFilter): { total: number; hits: EdgeHit[] } {
    const boss = filter.bossId === undefined ? -1 : this.ids.get(filter.bossId) ?? -2;
    const employee = filter.employeeId === undefined ? -1 : this.ids.get(filter.employeeId) ?? -2;
    if (boss === -2 || employee === -2) return { total: 0, hits: [] };
    let employees: Set<number> | null = null;
    if (filter.employeeIds !== undefined) {
      employees = new Set();
      for (const id of filter.employeeIds) {
        const index = this.ids.get(id);
        if (index !== undefined) employees.add(index);
      }
    }
    const since = filter.since ?? -Infinity;
    const until = filter.until ?? Infinity;
    const hits: EdgeHit[] = [];
    let total = 0;
    const edgeSlot = this.edgeSlot.data;
    const edgeBoss = this.edgeBoss.data;
    const edgeEmployee = this.edgeEmployee.data;
    const slotTime = this.slotTime.data;
    // Records newest first; the edges of one record in their target order.
    for (let groupEnd = this.edgeSlot.length - 1; groupEnd >= 0; ) {
      const slot = edgeSlot[groupEnd]!;
      let groupStart = groupEnd;
      while (groupStart > 0 && edgeSlot[groupStart - 1] === slot) groupStart--;
      const time = slotTime[slot - this.base]!;
      if (time >= since && time <= until) {
        for (let e = groupStart; e <= groupEnd; e++) {
          if (boss >= 0 && edgeBoss[e] !== boss) continue;
          if (employee >= 0 && edgeEmployee[e] !== employee) continue;
          if (employees !== null && !employees.has(edgeEmployee[e]!)) continue;
          if (total >= filter.offset && hits.length < filter.limit) hits.push({ slot, target: this.edgeTarget.data[e]! });
          total++;
        }
      }
      groupEnd = groupStart - 1;
    }
    return { total, hits };
  }

  /** Slots with timestamp >= since, oldest first, at most the newest `limit`. Records are appended in time order. */
  slotsSince(since: number, limit = Infinity): number[] {
    const out: number[] = [];
    for (let at = this.slotTime.length - 1; at >= 0 && out.length < limit && this.slotTime.data[at]! >= since; at--) out.push(this.base + at);
    return out.reverse();
  }

  /** The first slot to keep under an age cutoff and a count cap. */
  firstKept(oldestTime: number, maxRecords: number): number {
    let at = 0;
    while (at < this.slotTime.length && this.slotTime.data[at]! < oldestTime) at++;
    if (maxRecords > 0) at = Math.max(at, this.slotTime.length - maxRecords);
    return this.base + at;
  }

  /** Smallest file offset among slots from `slot` on (where a pruned file starts). */
  minOffsetFrom(slot: number): number {
    let min = Infinity;
    for (let at = slot - this.base; at < this.slotTime.length; at++) min = Math.min(min, this.slotOffset.data[at]!);
    return min;
  }

  /** Forgets slots before `slot` and moves every remaining offset back by `shift` bytes. */
  dropBefore(slot: number, shift: number): void {
    const count = slot - this.base;
    if (count > 0) {
      let edges = 0;
      while (edges < this.edgeSlot.length && this.edgeSlot.data[edges]! < slot) edges++;
      for (const column of [this.edgeSlot, this.edgeTarget, this.edgeBoss, this.edgeEmployee]) column.dropFront(edges);
      for (const column of [this.slotOffset, this.slotLength, this.slotTime]) column.dropFront(count);
      this.base = slot;
    }
    if (shift !== 0) for (let at = 0; at < this.slotOffset.length; at++) this.slotOffset.data[at]! -= shift;
  }
}
