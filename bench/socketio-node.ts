// A Socket.IO server with its Redis adapter, doing the relay's job the way a Socket.IO user
// would write it: the peer the cluster scenario compares the relay's cluster mode with. Several
// of these on one Redis are one service. Run as its own process:
//
//   node dist/bench/socketio-node.js PORT AUTHKEY REDIS_URL
//
// A boss connects with auth {role:"boss", authkey}, an employee with {role:"employee"}; the
// socket id is the address. A boss emits "message" {to, payload, msg_id} with an ack callback;
// the server emits to the socket id (or to everyone but the sender for "*") with an ack of its
// own and answers the boss once every reached client acknowledged: across nodes the Redis
// adapter is the only way a node learns that a socket on another node got the message, so this
// is the Socket.IO form of the relay's delivery_ack. /health answers like the relay's.

import http from 'node:http';
import { createAdapter } from '@socket.io/redis-adapter';
import { Redis } from 'ioredis';
import { Server, type Socket } from 'socket.io';

const [portArg, authkey, redisUrl] = process.argv.slice(2);
const port = Number(portArg);
if (!Number.isInteger(port) || port < 1 || !authkey || !redisUrl) {
  process.stderr.write('usage: socketio-node PORT AUTHKEY REDIS_URL\n');
  process.exit(2);
}

/** How long a node waits for client acks (and other nodes' counts) before answering with what it has. */
const ACK_TIMEOUT_MS = 10_000;

interface Outgoing {
  to: string;
  payload: unknown;
  msg_id: string;
}

export interface SocketIoAck {
  msg_id: string;
  /** Clients that acknowledged the message. */
  delivered: number;
  /** True when the wait for acknowledgements ran out before every reached client answered. */
  timed_out: boolean;
}

function parseOutgoing(value: unknown): Outgoing | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const { to, payload, msg_id: msgId } = value as Record<string, unknown>;
  if (typeof to !== 'string' || to === '' || typeof msgId !== 'string') return undefined;
  return { to, payload, msg_id: msgId };
}

const pub = new Redis(redisUrl, { lazyConnect: false, maxRetriesPerRequest: 3 });
const sub = pub.duplicate();
for (const client of [pub, sub]) client.on('error', (error: Error) => process.stderr.write(`redis: ${error.message}\n`));

let io: Server | undefined;
const httpServer = http.createServer((req, res) => {
  if (req.url === '/health') {
    // Ready only once both Redis connections are: before that, an emit would not reach the other node.
    if (pub.status !== 'ready' || sub.status !== 'ready') {
      res.writeHead(503, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ code: 'redis_not_ready', message: `Redis is ${pub.status}/${sub.status}; retry shortly.` }));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok: true, service: 'socketio-redis-bench', active_connections: io?.engine.clientsCount ?? 0 }));
    return;
  }
  res.writeHead(404, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ code: 'not_found', message: 'Only /health and /socket.io/ are served here.' }));
});

io = new Server(httpServer, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
  adapter: createAdapter(pub, sub, { publishOnSpecificResponseChannel: true, requestsTimeout: ACK_TIMEOUT_MS }),
});

io.use((socket, next) => {
  const auth = socket.handshake.auth as Record<string, unknown>;
  if (auth.role === 'boss' && auth.authkey === authkey) return next();
  if (auth.role === 'employee') return next();
  next(new Error(auth.role === 'boss' ? 'invalid_authkey' : 'invalid_role'));
});

io.on('connection', (socket: Socket) => {
  socket.on('message', (raw: unknown, ack: unknown) => {
    if (typeof ack !== 'function') return;
    const answer = ack as (reply: SocketIoAck | { error: string }) => void;
    const message = parseOutgoing(raw);
    if (!message) return answer({ error: 'a message needs {to: string, payload, msg_id: string}' });
    const frame = { msg_id: message.msg_id, from_id: socket.id, payload: message.payload };
    const target = message.to === '*' ? socket.broadcast : io!.to(message.to);
    target.timeout(ACK_TIMEOUT_MS).emit('message', frame, (error: Error | null, responses: unknown[]) => {
      answer({ msg_id: message.msg_id, delivered: responses.length, timed_out: error !== null });
    });
  });
});

httpServer.listen(port, '127.0.0.1');

let stopping = false;
const stop = () => {
  if (stopping) return;
  stopping = true;
  io?.close();
  pub.disconnect();
  sub.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
