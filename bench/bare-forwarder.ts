// The ceiling the relay is measured against: the same wire subset (hello, auth -> auth_ok,
// routing to an id / an array / "*", delivery_ack) on plain `ws`, with no storage, no
// validation and no limits. Whatever it reaches is what Node + ws can do on this machine.
//
// Run as its own process: node dist/bench/bare-forwarder.js <port> <authkey>
// It listens on 127.0.0.1, answers GET /health once listening, and exits on SIGTERM.

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import WebSocket, { WebSocketServer } from 'ws';

interface Peer {
  id: string;
  role: string;
}

export interface BareForwarder {
  port: number;
  close(): Promise<void>;
}

type Json = Record<string, unknown>;

const HELLO = () => JSON.stringify({ type: 'hello', message: 'Please authenticate', timestamp: Date.now() });

function routeTargets(to: unknown, senderId: string, peers: Map<string, WebSocket>): string[] {
  if (to === '*' || to === 'all') {
    const ids: string[] = [];
    for (const id of peers.keys()) if (id !== senderId) ids.push(id);
    return ids;
  }
  if (Array.isArray(to)) return to.filter((id): id is string => typeof id === 'string');
  return typeof to === 'string' ? [to] : [];
}

/** Forwards one message; the envelope is serialised once and only `to` differs per target. */
function forward(sender: WebSocket, from: Peer, frame: Json, peers: Map<string, WebSocket>): void {
  const msgId = typeof frame.msg_id === 'string' ? frame.msg_id : randomUUID();
  const timestamp = Date.now();
  const head =
    `{"type":"message","msg_id":${JSON.stringify(msgId)},"from_id":${JSON.stringify(from.id)},` +
    `"from_role":${JSON.stringify(from.role)},"to":`;
  const tail = `,"payload":${JSON.stringify(frame.payload ?? null)},"timestamp":${timestamp}}`;
  const delivered: string[] = [];
  const failed: { id: string; reason: string }[] = [];
  for (const id of routeTargets(frame.to, from.id, peers)) {
    const target = peers.get(id);
    if (target === undefined) {
      failed.push({ id, reason: 'target_not_found' });
      continue;
    }
    target.send(head + JSON.stringify(id) + tail);
    delivered.push(id);
  }
  sender.send(JSON.stringify({ type: 'delivery_ack', msg_id: msgId, delivered, failed, timestamp }));
}

function authenticate(ws: WebSocket, frame: Json, authkey: string, peers: Map<string, WebSocket>): Peer | undefined {
  const role = frame.role === 'boss' ? 'boss' : 'employee';
  if (role === 'boss' && frame.authkey !== authkey) {
    ws.send(JSON.stringify({ type: 'error', code: 'invalid_authkey', message: 'Wrong authkey.', timestamp: Date.now() }));
    ws.close(4003);
    return undefined;
  }
  const peer: Peer = { id: `${role}-${randomUUID()}`, role };
  peers.set(peer.id, ws);
  ws.send(
    JSON.stringify({
      type: 'auth_ok',
      id: peer.id,
      key: randomUUID(),
      role,
      name: role === 'boss' ? null : (frame.name ?? null),
      tags: role === 'boss' ? [] : (frame.tags ?? []),
      reconnected: false,
      timestamp: Date.now(),
    }),
  );
  return peer;
}

function serveConnection(ws: WebSocket, authkey: string, peers: Map<string, WebSocket>): void {
  let peer: Peer | undefined;
  ws.send(HELLO());
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString()) as Json;
    if (peer === undefined) {
      if (frame.type === 'auth') peer = authenticate(ws, frame, authkey, peers);
      return;
    }
    if (frame.type === 'message') forward(ws, peer, frame, peers);
    else if (frame.type === 'ping') ws.send(JSON.stringify({ type: 'pong', timestamp: Date.now() }));
  });
  ws.on('close', () => {
    if (peer !== undefined && peers.get(peer.id) === ws) peers.delete(peer.id);
  });
  ws.on('error', () => ws.terminate());
}

export function startBareForwarder(port: number, authkey: string): Promise<BareForwarder> {
  const peers = new Map<string, WebSocket>();
  const server = http.createServer((req, res) => {
    const ok = req.url === '/health';
    res.writeHead(ok ? 200 : 404, { 'content-type': 'application/json' });
    res.end(JSON.stringify(ok ? { ok: true, service: 'bare-forwarder', active_connections: peers.size } : { ok: false }));
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: 16 * 1024 * 1024 });
  server.on('upgrade', (req, socket, head) => {
    if (req.url !== '/ws') {
      socket.destroy();
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => serveConnection(ws, authkey, peers));
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      const address = server.address();
      resolve({
        port: typeof address === 'object' && address !== null ? address.port : port,
        close: () =>
          new Promise<void>((done) => {
            for (const ws of wss.clients) ws.terminate();
            wss.close();
            server.close(() => done());
          }),
      });
    });
  });
}

if (require.main === module) {
  const [portText, authkey] = process.argv.slice(2);
  if (portText === undefined || authkey === undefined) {
    process.stderr.write('usage: node dist/bench/bare-forwarder.js <port> <authkey>\n');
    process.exit(2);
  }
  startBareForwarder(Number(portText), authkey).then(
    (forwarder) => {
      const stop = () => void forwarder.close().then(() => process.exit(0));
      process.once('SIGTERM', stop);
      process.once('SIGINT', stop);
    },
    (error: unknown) => {
      process.stderr.write(`bare forwarder failed to start: ${String(error)}\n`);
      process.exit(1);
    },
  );
}
