// Shared test helpers: a real relay on a free loopback port with a temp data dir, and a
// WebSocket client that collects frames so a test can await the next one of a type.
// With MIMICLAW_TEST_CLUSTER=N (npm run test:cluster) startTestRelay gives N relay nodes on one
// redis-server behind a round-robin balancer instead, so the protocol tests run against a cluster.

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import WebSocket from 'ws';
import { startRelay, type RelayHandle, type RelayOptions } from '../server';
import { startRedis, type TestRedis } from './redis-harness';
import { startBalancer } from './tcp-balancer';

export const TEST_AUTHKEY = 'test-secret';

export interface TestRelay {
  relay: RelayHandle;
  dataDir: string;
  options: RelayOptions;
  /** Restart on the same data dir with the same options (plus overrides). */
  restart(overrides?: Partial<RelayOptions>): Promise<TestRelay>;
  /** Close the relay and remove the data dir. */
  dispose(): Promise<void>;
}

export async function makeTempDir(prefix = 'mimiclaw-test-'): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), prefix));
}

/** MIMICLAW_TEST_CLUSTER: how many cluster nodes startTestRelay starts; 0 (unset) means one plain relay. */
export const TEST_CLUSTER_NODES = clusterNodesFromEnv(process.env.MIMICLAW_TEST_CLUSTER);

function clusterNodesFromEnv(value: string | undefined): number {
  if (value === undefined || value === '' || value === '0') return 0;
  const count = Number(value);
  if (!Number.isInteger(count) || count < 1 || count > 9) throw new Error(`MIMICLAW_TEST_CLUSTER must be a node count from 1 to 9 (or unset for one plain relay), got "${value}"`);
  return count;
}

/**
 * For a test that looks inside one relay (its data dir files, its in-process event bus, its
 * per-process limits): skipped, with the reason, when the tests run against a cluster.
 */
export function singleRelayOnly(reason: string): { skip?: string } {
  return TEST_CLUSTER_NODES > 0 ? { skip: `single relay only: ${reason}` } : {};
}

/** For a test a cluster does not pass yet (a known cluster defect, named in the reason): skipped against a cluster. */
export function clusterKnownGap(reason: string): { skip?: string } {
  return TEST_CLUSTER_NODES > 0 ? { skip: `known cluster gap: ${reason}` } : {};
}

export async function startTestRelay(overrides: Partial<RelayOptions> = {}, dataDir?: string): Promise<TestRelay> {
  if (TEST_CLUSTER_NODES > 0) return startTestCluster(TEST_CLUSTER_NODES, overrides, dataDir);
  const dir = dataDir ?? (await makeTempDir());
  const options: RelayOptions = {
    port: 0,
    host: '127.0.0.1',
    authkey: TEST_AUTHKEY,
    dataDir: dir,
    logLevel: 'silent',
    ...overrides,
  };
  const relay = await startRelay(options);
  let closed = false;
  const close = async () => {
    if (!closed) {
      closed = true;
      await relay.close();
    }
  };
  return {
    relay,
    dataDir: dir,
    options,
    async restart(more = {}) {
      await close();
      return startTestRelay({ ...overrides, ...more }, dir);
    },
    async dispose() {
      await close();
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * `count` relays on one redis-server, each with its own data dir (`<dataDir>/node-<i>`), behind a
 * round-robin TCP balancer. The handle looks like one relay's: url and httpUrl are the
 * balancer's, close() stops the balancer and every node; dispose() also stops Redis.
 * restart() restarts the nodes on the same dirs and the same Redis, as one relay restarts on its
 * data dir. `events` is node 0's bus only, so tests that watch it are single-relay tests.
 */
async function startTestCluster(count: number, overrides: Partial<RelayOptions>, dataDir?: string, sharedRedis?: TestRedis): Promise<TestRelay> {
  const dir = dataDir ?? (await makeTempDir('mimiclaw-cluster-test-'));
  const redis = sharedRedis ?? (await startRedis());
  const nodes: RelayHandle[] = [];
  const closeNodes = async () => {
    for (const node of nodes.splice(0)) await node.close();
  };
  let options: RelayOptions | undefined;
  let balancer: Awaited<ReturnType<typeof startBalancer>>;
  try {
    for (let i = 0; i < count; i++) {
      const nodeDir = path.join(dir, `node-${i}`);
      await fs.mkdir(nodeDir, { recursive: true });
      const nodeOptions: RelayOptions = {
        host: '127.0.0.1',
        authkey: TEST_AUTHKEY,
        dataDir: nodeDir,
        logLevel: 'silent',
        ...overrides,
        // A port given (a restart on the same port) is the balancer's: clients keep their URL.
        port: 0,
        redisUrl: redis.url,
        nodeId: `node-${i}`,
      };
      options ??= nodeOptions;
      nodes.push(await startRelay(nodeOptions));
    }
    balancer = await startBalancer(
      nodes.map((node) => ({ host: '127.0.0.1', port: node.port })),
      { port: overrides.port ?? 0 },
    );
  } catch (error) {
    await closeNodes().catch(() => undefined);
    if (sharedRedis === undefined) await redis.stop().catch(() => undefined);
    throw error;
  }
  const first = nodes[0]!;
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await balancer.close();
    await closeNodes();
  };
  // The balancer forwards bytes: with TLS on the nodes, clients speak TLS through it.
  const secure = first.httpUrl.startsWith('https:');
  const relay: RelayHandle = {
    ...first,
    url: secure ? balancer.wsUrl(overrides.wsPath).replace(/^ws:/, 'wss:') : balancer.wsUrl(overrides.wsPath),
    httpUrl: secure ? balancer.httpUrl.replace(/^http:/, 'https:') : balancer.httpUrl,
    port: balancer.port,
    dataDir: dir,
    close,
    // As an operator reloads every node (SIGHUP to each); the first node's answer.
    reload: async () => (await Promise.all(nodes.map((node) => node.reload())))[0]!,
  };
  return {
    relay,
    dataDir: dir,
    options: options!,
    async restart(more = {}) {
      await close();
      return startTestCluster(count, { ...overrides, ...more }, dir, redis);
    },
    async dispose() {
      await close();
      await redis.stop();
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}

/** What the socket and HTTP helpers need of a relay: an in-process handle or a child process. */
export type RelayEndpoint = Pick<RelayHandle, 'url' | 'httpUrl'>;

export type Frame = Record<string, unknown> & { type: string };

export interface CloseInfo {
  code: number;
  reason: string;
}

export class TestSocket {
  readonly ws: WebSocket;
  readonly frames: Frame[] = [];
  readonly closed: Promise<CloseInfo>;
  private waiters: { accept: (f: Frame) => boolean; resolve: (f: Frame) => void }[] = [];

  constructor(url: string) {
    this.ws = new WebSocket(url);
    this.ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame;
      const waiter = this.waiters.find((w) => w.accept(frame));
      if (waiter) {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        waiter.resolve(frame);
      } else {
        this.frames.push(frame);
      }
    });
    this.closed = new Promise((resolve) => {
      this.ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
    });
    this.ws.on('error', () => undefined);
  }

  opened(): Promise<void> {
    if (this.ws.readyState === WebSocket.OPEN) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.ws.once('open', () => resolve());
      this.ws.once('error', reject);
    });
  }

  send(frame: unknown): void {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
  }

  /** The next frame (of `type`, or matching `accept`), from those already received or still to come. */
  next(type?: string | ((f: Frame) => boolean), timeoutMs = 5000): Promise<Frame> {
    const accept = typeof type === 'function' ? type : (f: Frame) => type === undefined || f.type === type;
    const index = this.frames.findIndex(accept);
    if (index >= 0) return Promise.resolve(this.frames.splice(index, 1)[0]!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for frame ${String(typeof type === 'string' ? type : 'matching')}`));
      }, timeoutMs);
      const done = (f: Frame) => {
        clearTimeout(timer);
        resolve(f);
      };
      this.waiters.push({ accept, resolve: done });
    });
  }

  close(): Promise<CloseInfo> {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close();
    return this.closed;
  }
}

/** Opens a socket and consumes the hello frame. */
export async function connect(relay: RelayEndpoint): Promise<TestSocket> {
  const socket = new TestSocket(relay.url);
  await socket.opened();
  await socket.next('hello');
  return socket;
}

export interface Authed {
  socket: TestSocket;
  id: string;
  key: string;
}

export async function authBoss(relay: RelayEndpoint, authkey = TEST_AUTHKEY): Promise<Authed> {
  const socket = await connect(relay);
  socket.send({ type: 'auth', role: 'boss', authkey });
  const ok = await socket.next('auth_ok');
  return { socket, id: String(ok.id), key: String(ok.key) };
}

export async function authEmployee(
  relay: RelayEndpoint,
  name = 'Worker',
  tags: string[] = ['general'],
  extra: Record<string, unknown> = {},
): Promise<Authed> {
  const socket = await connect(relay);
  socket.send({ type: 'auth', role: 'employee', name, tags, ...extra });
  const ok = await socket.next('auth_ok');
  return { socket, id: String(ok.id), key: String(ok.key) };
}

export async function reconnect(relay: RelayEndpoint, who: { id: string; key: string }, role: 'boss' | 'employee', extra: Record<string, unknown> = {}): Promise<{ socket: TestSocket; ok: Frame }> {
  const socket = await connect(relay);
  socket.send({ type: 'auth', role, identity: { id: who.id, key: who.key }, ...extra });
  const ok = await socket.next();
  return { socket, ok };
}

/** JSON over HTTP against the relay's admin API. */
export async function http(
  relay: RelayEndpoint,
  method: string,
  route: string,
  options: { body?: unknown; authkey?: string; headers?: Record<string, string> } = {},
): Promise<{ status: number; body: Record<string, unknown>; headers: Headers }> {
  const headers: Record<string, string> = { ...options.headers };
  if (options.authkey !== undefined) headers['x-auth-key'] = options.authkey;
  if (options.body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(relay.httpUrl + route, {
    method,
    headers,
    body: options.body === undefined ? undefined : typeof options.body === 'string' ? options.body : JSON.stringify(options.body),
  });
  const text = await response.text();
  let body: Record<string, unknown>;
  try {
    body = JSON.parse(text) as Record<string, unknown>;
  } catch {
    body = { raw: text };
  }
  return { status: response.status, body, headers: response.headers };
}
