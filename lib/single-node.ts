// The ClusterLink of a relay without --redis: nothing exists elsewhere. The router checks
// `clustered` before any cluster step, so on a single node none of the methods below runs on
// the message path; they answer "nothing there" in case an embedder calls them anyway.

import type { ClusterLink, DedupeClaim, RemoteOutcome } from './cluster-link';

export class SingleNode implements ClusterLink {
  readonly clustered = false;
  readonly available = true;

  constructor(readonly nodeId: string) {}

  attach(): void {}
  locate(): undefined {
    return undefined;
  }
  onlineIds(): Iterable<string> {
    return [];
  }
  onlineCount(): number {
    return 0;
  }
  joined(): Promise<boolean> {
    return Promise.resolve(true);
  }
  left(): void {}
  fetchIdentity(): Promise<undefined> {
    return Promise.resolve(undefined);
  }
  setBanned(): Promise<void> {
    return Promise.resolve();
  }
  removeIdentity(): Promise<null> {
    return Promise.resolve(null);
  }
  keyRotated(): Promise<null> {
    return Promise.resolve(null);
  }
  deliverElsewhere(_pieces: unknown, ids: readonly string[]): Promise<Record<string, RemoteOutcome>> {
    return Promise.resolve(Object.fromEntries(ids.map((id) => [id, 'offline' as const])));
  }
  broadcastElsewhere(): Promise<string[]> {
    return Promise.resolve([]);
  }
  enqueue(): Promise<void> {
    return Promise.reject(new Error('A single node keeps its queue in queue.db.'));
  }
  wake(): void {}
  takeQueued(): Promise<[]> {
    return Promise.resolve([]);
  }
  returnQueued(): Promise<void> {
    return Promise.resolve();
  }
  finishQueued(): void {}
  claimMsgId(): Promise<DedupeClaim> {
    return Promise.resolve({ kind: 'new' });
  }
  settleMsgId(): void {}
  releaseMsgId(): void {}
  close(): Promise<void> {
    return Promise.resolve();
  }
}
