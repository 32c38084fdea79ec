// A plain round-robin TCP load balancer for cluster tests: the stand-in for nginx or HAProxy in
// front of several relay nodes. It knows nothing about HTTP or WebSocket; it forwards bytes.
// Each new client connection goes to the next backend that accepts it, so a stopped node is
// skipped the way a real balancer's failed connect makes it try the next upstream.
// Loopback only and bounded: a cap on open connections and on each connect attempt.

import net from 'node:net';

export interface Backend {
  host: string;
  port: number;
}

export interface BalancerOptions {
  /** Client connections open at once; more are refused (closed at once). Default 1024. */
  maxConnections?: number;
  /** A backend that has not accepted within this long counts as refusing. Default 2000 ms. */
  connectTimeoutMs?: number;
  /** After one side has closed, how long the other may take to finish writing. Default 5000 ms. */
  closeGraceMs?: number;
  /** The port to listen on (127.0.0.1); default 0, a free one. */
  port?: number;
}

export interface Balancer {
  /** The balancer's own port on 127.0.0.1. */
  port: number;
  /** ws://127.0.0.1:PORT/ws: the same shape as a relay handle, so test helpers take it as is. */
  url: string;
  /** http://127.0.0.1:PORT */
  httpUrl: string;
  /** ws://127.0.0.1:PORT + path, for a relay started with another --ws-path. */
  wsUrl(path?: string): string;
  /** Replaces the backends for connections made from now on (the rotation starts again at the first); open ones stay where they are. */
  setBackends(backends: Backend[]): void;
  /** How many client connections each backend took so far, keyed "host:port". */
  accepted(): Map<string, number>;
  /** Client connections open now. */
  openConnections(): number;
  /** Stops listening and destroys every open connection. */
  close(): Promise<void>;
}

const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

function checkBackends(backends: Backend[]): Backend[] {
  for (const b of backends) {
    if (!LOOPBACK.has(b.host)) throw new Error(`tcp-balancer: backend host must be loopback (127.0.0.1, ::1, localhost), got "${b.host}"`);
    if (!Number.isInteger(b.port) || b.port < 1 || b.port > 65_535) throw new Error(`tcp-balancer: backend port must be 1..65535, got ${String(b.port)}`);
  }
  return backends.map((b) => ({ host: b.host, port: b.port }));
}

const keyOf = (b: Backend) => `${b.host}:${b.port}`;

export async function startBalancer(initial: Backend[], options: BalancerOptions = {}): Promise<Balancer> {
  const maxConnections = options.maxConnections ?? 1024;
  const connectTimeoutMs = options.connectTimeoutMs ?? 2000;
  const closeGraceMs = options.closeGraceMs ?? 5000;
  let backends = checkBackends(initial);
  let cursor = 0;
  const accepted = new Map<string, number>();
  /** Client connections open now. */
  const open = new Set<net.Socket>();
  /** Every socket still alive, clients and upstreams, for close(). */
  const alive = new Set<net.Socket>();
  const track = (socket: net.Socket) => {
    alive.add(socket);
    socket.once('close', () => alive.delete(socket));
  };

  /** Tries the backends from the cursor on, one after another; resolves with the first that accepts. */
  function connectUpstream(client: net.Socket): Promise<{ upstream: net.Socket; backend: Backend } | undefined> {
    const list = backends;
    const start = list.length === 0 ? 0 : cursor % list.length;
    cursor = start + 1;
    return new Promise((resolve) => {
      const attempt = (tried: number) => {
        if (tried >= list.length || client.destroyed) return resolve(undefined);
        const backend = list[(start + tried) % list.length]!;
        const upstream = net.connect({ host: backend.host, port: backend.port });
        const timer = setTimeout(() => upstream.destroy(new Error('connect timeout')), connectTimeoutMs);
        timer.unref();
        const failed = () => {
          clearTimeout(timer);
          upstream.destroy();
          attempt(tried + 1);
        };
        upstream.once('error', failed);
        upstream.once('connect', () => {
          clearTimeout(timer);
          upstream.off('error', failed);
          resolve({ upstream, backend });
        });
      };
      attempt(0);
    });
  }

  /** Either side closing ends the other; an error, or a side that will not finish, destroys both. */
  function join(client: net.Socket, upstream: net.Socket): void {
    // As nginx (tcp_nodelay) and HAProxy do: forwarded bytes go out at once, not held back by
    // Nagle's algorithm until the peer's delayed ACK (tens of ms on a loopback socket).
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    let grace: NodeJS.Timeout | undefined;
    const destroyBoth = () => {
      clearTimeout(grace);
      client.destroy();
      upstream.destroy();
    };
    const endOther = (other: net.Socket) => () => {
      if (other.destroyed) return clearTimeout(grace);
      other.end();
      grace ??= setTimeout(destroyBoth, closeGraceMs);
      grace.unref();
    };
    client.on('error', destroyBoth);
    upstream.on('error', destroyBoth);
    client.once('close', endOther(upstream));
    upstream.once('close', endOther(client));
    client.pipe(upstream);
    upstream.pipe(client);
  }

  const server = net.createServer({ pauseOnConnect: true }, (client) => {
    if (open.size >= maxConnections) {
      client.destroy();
      return;
    }
    open.add(client);
    client.once('close', () => open.delete(client));
    track(client);
    // Until an upstream is chosen the client is paused; an error now just ends it.
    const early = () => client.destroy();
    client.on('error', early);
    void connectUpstream(client).then((chosen) => {
      client.off('error', early);
      if (!chosen) {
        client.destroy();
        return;
      }
      const { upstream, backend } = chosen;
      if (client.destroyed) {
        upstream.destroy();
        return;
      }
      track(upstream);
      accepted.set(keyOf(backend), (accepted.get(keyOf(backend)) ?? 0) + 1);
      join(client, upstream);
    });
  });
  server.maxConnections = maxConnections;

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  if (address === null || typeof address !== 'object') throw new Error('tcp-balancer: no listening address');
  const port = address.port;

  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    httpUrl: `http://127.0.0.1:${port}`,
    wsUrl: (path = '/ws') => `ws://127.0.0.1:${port}${path}`,
    setBackends(next) {
      backends = checkBackends(next);
      cursor = 0;
    },
    accepted: () => new Map(accepted),
    openConnections: () => open.size,
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        for (const socket of alive) socket.destroy();
      });
    },
  };
}
