// The relay's throughput, latency and fan-out workloads (workloads.ts) written against the
// Socket.IO peer (socketio-node.ts) with socket.io-client: same counts, same payload, same
// measuring points, so the rows compare. The boss's ack is the server's answer once the reached
// clients acknowledged (see socketio-node.ts).

import { randomBytes } from 'node:crypto';
import { io, type Socket } from 'socket.io-client';
import { BENCH_AUTHKEY } from './servers';
import type { SocketIoAck } from './socketio-node';
import { nowMs, withTimeout } from './proc';
import { percentile } from './stats';
import { PAYLOAD_VALUE, type FanoutResult, type LatencyResult, type ThroughputResult } from './workloads';

/** http://127.0.0.1:PORT of one Socket.IO node. */
export type NodeUrl = string;

interface Peer {
  socket: Socket;
  id: string;
}

type MessageHandler = (frame: unknown) => void;

export function connectPeer(url: NodeUrl, role: 'boss' | 'employee'): Promise<Peer> {
  const socket = io(url, {
    transports: ['websocket'],
    reconnection: false,
    forceNew: true,
    auth: role === 'boss' ? { role, authkey: BENCH_AUTHKEY } : { role },
    timeout: 30_000,
  });
  const attempt = new Promise<Peer>((resolve, reject) => {
    socket.once('connect', () => {
      socket.off('connect_error');
      if (socket.id === undefined) reject(new Error('socket.io connected without an id'));
      else resolve({ socket, id: socket.id });
    });
    socket.once('connect_error', (error: Error) => {
      socket.close();
      reject(new Error(`socket.io ${role} connect to ${url}: ${error.message}`));
    });
  });
  return withTimeout(attempt, 30_000, `socket.io ${role} connect at ${url}`);
}

/** Every reached client acknowledges at once; `onMessage` sees the frame after that. */
function employee(peer: Peer, onMessage: MessageHandler): void {
  peer.socket.on('message', (frame: unknown, ack: unknown) => {
    if (typeof ack === 'function') (ack as (ok: boolean) => void)(true);
    onMessage(frame);
  });
}

function checkAck(reply: unknown, expected: number): SocketIoAck {
  const ack = reply as Partial<SocketIoAck> & { error?: string };
  if (ack.error) throw new Error(`socket.io server refused the message: ${ack.error}`);
  if (ack.delivered !== expected || ack.timed_out) throw new Error(`socket.io ack: delivered ${String(ack.delivered)} of ${expected}${ack.timed_out ? ' (timed out)' : ''}`);
  return ack as SocketIoAck;
}

function closePeers(peers: (Peer | undefined)[]): void {
  for (const peer of peers) peer?.socket.close();
}

export async function runSocketIoThroughput(bossUrl: NodeUrl, employeeUrl: NodeUrl, messages: number, inFlight: number, timeoutMs: number): Promise<ThroughputResult> {
  const boss = await connectPeer(bossUrl, 'boss');
  const worker = await connectPeer(employeeUrl, 'employee').catch((error: unknown) => {
    closePeers([boss]);
    throw error;
  });
  const msgIdPrefix = `t${randomBytes(4).toString('hex')}-`;
  const sentAt = new Float64Array(messages);
  const ackMs = new Float64Array(messages);
  let sent = 0;
  let acked = 0;
  let received = 0;
  let startedAt = 0;
  const cpuBefore = process.cpuUsage();
  const run = new Promise<number>((resolve, reject) => {
    const finishIfDone = () => {
      if (acked === messages && received === messages) resolve(nowMs() - startedAt);
    };
    const send = () => {
      const index = sent++;
      sentAt[index] = nowMs();
      boss.socket.emit('message', { to: worker.id, payload: PAYLOAD_VALUE, msg_id: `${msgIdPrefix}${index}` }, (reply: unknown) => {
        try {
          checkAck(reply, 1);
        } catch (error) {
          return reject(error);
        }
        ackMs[acked++] = nowMs() - (sentAt[index] ?? Number.NaN);
        if (sent < messages) send();
        finishIfDone();
      });
    };
    employee(worker, () => {
      received++;
      finishIfDone();
    });
    boss.socket.on('disconnect', (reason) => reject(new Error(`boss disconnected (${reason}) mid-run`)));
    worker.socket.on('disconnect', (reason) => reject(new Error(`employee disconnected (${reason}) mid-run`)));
    startedAt = nowMs();
    while (sent < Math.min(inFlight, messages)) send();
  });
  try {
    const elapsedMs = await withTimeout(run, timeoutMs, 'socket.io throughput run');
    const cpu = process.cpuUsage(cpuBefore);
    return {
      clientCpuUsPerMsg: (cpu.user + cpu.system) / messages,
      sent,
      msgIdPrefix,
      msgsPerSec: (messages * 1000) / elapsedMs,
      ackP50Ms: percentile(ackMs, 50, acked),
      ackP99Ms: percentile(ackMs, 99, acked),
    };
  } finally {
    closePeers([boss, worker]);
  }
}

/** One at a time, after `warmup`: a window right after start, then the steady state (as runLatency). */
export async function runSocketIoLatency(bossUrl: NodeUrl, employeeUrl: NodeUrl, messages: number, warmup: number, timeoutMs: number): Promise<LatencyResult> {
  const boss = await connectPeer(bossUrl, 'boss');
  const worker = await connectPeer(employeeUrl, 'employee').catch((error: unknown) => {
    closePeers([boss]);
    throw error;
  });
  const prefix = `l${randomBytes(4).toString('hex')}-`;
  const total = warmup + 2 * messages;
  const latency = new Float64Array(2 * messages);
  let index = 0;
  let sentAt = 0;
  let received = false;
  let acked = false;
  const run = new Promise<void>((resolve, reject) => {
    const step = () => {
      if (!received || !acked) return;
      index++;
      if (index === total) resolve();
      else sendNext();
    };
    const sendNext = () => {
      received = false;
      acked = false;
      sentAt = nowMs();
      boss.socket.emit('message', { to: worker.id, payload: PAYLOAD_VALUE, msg_id: `${prefix}${index}` }, (reply: unknown) => {
        try {
          checkAck(reply, 1);
        } catch (error) {
          return reject(error);
        }
        acked = true;
        step();
      });
    };
    employee(worker, () => {
      const elapsed = nowMs() - sentAt;
      if (index >= warmup) latency[index - warmup] = elapsed;
      received = true;
      step();
    });
    sendNext();
  });
  try {
    await withTimeout(run, timeoutMs, 'socket.io latency run');
    const fresh = latency.slice(0, messages);
    const steady = latency.slice(messages);
    return { p50Ms: percentile(steady, 50), p99Ms: percentile(steady, 99), freshP50Ms: percentile(fresh, 50), freshP99Ms: percentile(fresh, 99) };
  } finally {
    closePeers([boss, worker]);
  }
}

/** `count` employees, employee i on employeeUrls[i % n], at most `concurrency` connecting at once. */
async function connectEmployees(employeeUrls: NodeUrl[], count: number, concurrency = 100): Promise<Peer[]> {
  const peers: Peer[] = [];
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const index = next++;
      peers.push(await connectPeer(employeeUrls[index % employeeUrls.length]!, 'employee'));
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  } catch (error) {
    closePeers(peers);
    throw error;
  }
  return peers;
}

/** Sequential broadcasts from a boss on `bossUrl` to `employees` spread over `employeeUrls`. */
export async function runSocketIoFanout(bossUrl: NodeUrl, employeeUrls: NodeUrl[], employees: number, broadcasts: number, warmup: number, timeoutMs: number): Promise<FanoutResult> {
  let receivers: Peer[] = [];
  let boss: Peer | undefined;
  try {
    receivers = await connectEmployees(employeeUrls, employees);
    boss = await connectPeer(bossUrl, 'boss');
    const times = await withTimeout(broadcastRounds(boss, receivers, broadcasts + warmup), timeoutMs, 'socket.io fan-out run');
    const measured = times.slice(warmup);
    const totalMs = measured.reduce((sum, t) => sum + t, 0);
    return { deliveriesPerSec: (employees * measured.length * 1000) / totalMs, timeToAllMs: percentile(measured, 50) };
  } finally {
    closePeers([boss, ...receivers]);
  }
}

function broadcastRounds(boss: Peer, receivers: Peer[], rounds: number): Promise<number[]> {
  const prefix = `f${randomBytes(4).toString('hex')}-`;
  const times: number[] = [];
  let received = 0;
  let acked = false;
  let sentAt = 0;
  let lastReceiptAt = 0;
  return new Promise((resolve, reject) => {
    const step = () => {
      if (received < receivers.length || !acked) return;
      times.push(lastReceiptAt - sentAt);
      if (times.length === rounds) resolve(times);
      else sendNext();
    };
    const sendNext = () => {
      received = 0;
      acked = false;
      sentAt = nowMs();
      boss.socket.emit('message', { to: '*', payload: PAYLOAD_VALUE, msg_id: `${prefix}${times.length}` }, (reply: unknown) => {
        try {
          checkAck(reply, receivers.length);
        } catch (error) {
          return reject(error);
        }
        acked = true;
        step();
      });
    };
    const onReceipt = () => {
      received++;
      if (received === receivers.length) lastReceiptAt = nowMs();
      step();
    };
    for (const receiver of receivers) employee(receiver, onReceipt);
    sendNext();
  });
}
