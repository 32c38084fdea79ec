// The measured workloads. Each runs against a server URL and knows nothing about which server
// it is talking to.

import { randomBytes } from 'node:crypto';
import { closeAll, connectAndAuth, connectEmployees, errorOf, type AuthedSocket } from './load-client';
import { nowMs, withTimeout } from './proc';
import { percentile } from './stats';

type Frame = Record<string, unknown> & { type: string };

/** A payload of about 150 bytes, like a small task description. */
export const PAYLOAD_VALUE = { task: 'summarise', priority: 2, body: 'x'.repeat(100) };
const PAYLOAD = JSON.stringify(PAYLOAD_VALUE);

function parse(data: unknown): Frame {
  return JSON.parse(String(data)) as Frame;
}

export interface ThroughputResult {
  sent: number;
  msgIdPrefix: string;
  msgsPerSec: number;
  ackP50Ms: number;
  ackP99Ms: number;
  /** CPU the load client itself used per message: shows whether the client was the limit. */
  clientCpuUsPerMsg: number;
}

/**
 * One boss -> one employee, `inFlight` messages outstanding by delivery_ack. The employee
 * connects to `employeeUrl` (another node of a cluster) when given.
 */
export async function runThroughput(url: string, messages: number, inFlight: number, timeoutMs: number, employeeUrl = url): Promise<ThroughputResult> {
  const boss = await connectAndAuth(url, 'boss');
  const employee = await connectAndAuth(employeeUrl, 'employee', 'bench-throughput');
  const msgIdPrefix = `t${randomBytes(4).toString('hex')}-`;
  const head = `{"type":"message","to":${JSON.stringify(employee.id)},"payload":${PAYLOAD},"msg_id":"${msgIdPrefix}`;
  const sentAt = new Float64Array(messages);
  const ackMs = new Float64Array(messages);
  let sent = 0;
  let acked = 0;
  let received = 0;
  let startedAt = 0;
  const send = () => {
    sentAt[sent] = nowMs();
    boss.ws.send(`${head}${sent}"}`);
    sent++;
  };
  const cpuBefore = process.cpuUsage();
  const run = new Promise<number>((resolve, reject) => {
    const finishIfDone = () => {
      if (acked === messages && received === messages) resolve(nowMs() - startedAt);
    };
    boss.ws.on('message', (data) => {
      const frame = parse(data);
      const error = errorOf(frame);
      if (error) return reject(error);
      if (frame.type !== 'delivery_ack') return;
      const delivered = frame.delivered as string[];
      if (delivered.length !== 1) return reject(new Error(`message not delivered: ${JSON.stringify(frame)}`));
      const index = Number(String(frame.msg_id).slice(msgIdPrefix.length));
      ackMs[acked++] = nowMs() - (sentAt[index] ?? Number.NaN);
      if (sent < messages) send();
      finishIfDone();
    });
    employee.ws.on('message', () => {
      received++;
      finishIfDone();
    });
    boss.ws.on('close', (code) => reject(new Error(`boss socket closed (${code}) mid-run`)));
    employee.ws.on('close', (code) => reject(new Error(`employee socket closed (${code}) mid-run`)));
    startedAt = nowMs();
    while (sent < Math.min(inFlight, messages)) send();
  });
  try {
    const elapsedMs = await withTimeout(run, timeoutMs, 'throughput run');
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
    closeAll([boss, employee]);
  }
}

export interface LatencyResult {
  p50Ms: number;
  p99Ms: number;
  /** The same, over the `messages` right after the warm-up, while the server is still new. */
  freshP50Ms: number;
  freshP99Ms: number;
}

/**
 * One message at a time: the next is sent after the previous was received and acked. After
 * `warmup` messages, two windows of `messages` each: the first shows a freshly started server
 * (JIT still compiling its code), the second the steady state.
 */
export async function runLatency(url: string, messages: number, warmup: number, timeoutMs: number, employeeUrl = url): Promise<LatencyResult> {
  const boss = await connectAndAuth(url, 'boss');
  const employee = await connectAndAuth(employeeUrl, 'employee', 'bench-latency');
  const head = `{"type":"message","to":${JSON.stringify(employee.id)},"payload":${PAYLOAD},"msg_id":"l${randomBytes(4).toString('hex')}-`;
  const total = warmup + 2 * messages;
  const latency = new Float64Array(2 * messages);
  let index = 0;
  let sentAt = 0;
  let received = false;
  let acked = false;
  const run = new Promise<void>((resolve, reject) => {
    const sendNext = () => {
      received = false;
      acked = false;
      sentAt = nowMs();
      boss.ws.send(`${head}${index}"}`);
    };
    const step = () => {
      if (!received || !acked) return;
      index++;
      if (index === total) resolve();
      else sendNext();
    };
    employee.ws.on('message', () => {
      const elapsed = nowMs() - sentAt;
      if (index >= warmup) latency[index - warmup] = elapsed;
      received = true;
      step();
    });
    boss.ws.on('message', (data) => {
      const frame = parse(data);
      const error = errorOf(frame);
      if (error) return reject(error);
      if (frame.type !== 'delivery_ack') return;
      acked = true;
      step();
    });
    sendNext();
  });
  try {
    await withTimeout(run, timeoutMs, 'latency run');
    const fresh = latency.slice(0, messages);
    const steady = latency.slice(messages);
    return { p50Ms: percentile(steady, 50), p99Ms: percentile(steady, 99), freshP50Ms: percentile(fresh, 50), freshP99Ms: percentile(fresh, 99) };
  } finally {
    closeAll([boss, employee]);
  }
}

export interface FanoutResult {
  deliveriesPerSec: number;
  /** Median time from send until the last employee received one broadcast. */
  timeToAllMs: number;
}

/**
 * Sequential broadcasts to `employees` connected employees; each waits for all receipts and the
 * ack. The employees connect to `employeeUrls` in turn (the nodes of a cluster) when given.
 */
export async function runFanout(url: string, employees: number, broadcasts: number, warmup: number, timeoutMs: number, employeeUrls = [url]): Promise<FanoutResult> {
  let receivers: AuthedSocket[] = [];
  let boss: AuthedSocket | undefined;
  try {
    receivers = await connectEmployees(employeeUrls, employees);
    boss = await connectAndAuth(url, 'boss');
    const times = await withTimeout(broadcastRounds(boss, receivers, broadcasts + warmup), timeoutMs, 'fan-out run');
    const measured = times.slice(warmup);
    const totalMs = measured.reduce((sum, t) => sum + t, 0);
    return { deliveriesPerSec: (employees * measured.length * 1000) / totalMs, timeToAllMs: percentile(measured, 50) };
  } finally {
    closeAll(boss ? [boss, ...receivers] : receivers);
  }
}

function broadcastRounds(boss: AuthedSocket, receivers: AuthedSocket[], rounds: number): Promise<number[]> {
  const head = `{"type":"message","to":"*","payload":${PAYLOAD},"msg_id":"f${randomBytes(4).toString('hex')}-`;
  const times: number[] = [];
  let received = 0;
  let acked = false;
  let sentAt = 0;
  let lastReceiptAt = 0;
  return new Promise((resolve, reject) => {
    const sendNext = () => {
      received = 0;
      acked = false;
      sentAt = nowMs();
      boss.ws.send(`${head}${times.length}"}`);
    };
    const step = () => {
      if (received < receivers.length || !acked) return;
      times.push(lastReceiptAt - sentAt);
      if (times.length === rounds) resolve(times);
      else sendNext();
    };
    const onReceipt = () => {
      received++;
      if (received === receivers.length) lastReceiptAt = nowMs();
      step();
    };
    for (const receiver of receivers) receiver.ws.on('message', onReceipt);
    boss.ws.on('message', (data) => {
      const frame = parse(data);
      const error = errorOf(frame);
      if (error) return reject(error);
      if (frame.type !== 'delivery_ack') return;
      const delivered = (frame.delivered as string[]).length;
      if (delivered !== receivers.length) {
        return reject(new Error(`broadcast reached ${delivered} of ${receivers.length} employees`));
      }
      acked = true;
      step();
    });
    sendNext();
  });
}

export interface TasksResult {
  tasksPerSec: number;
}

/**
 * 1 boss, `employees` employees of capacity `capacity`, `tasks` tasks with `inFlight` waiting for
 * their reply. Each employee answers a task at once with a message carrying in_reply_to; a task
 * counts when its reply reaches the boss. `direct` sends each task to an employee's id in turn;
 * `any` sends it to any:bench-tasks and lets the relay choose (part C).
 */
export async function runTasks(url: string, mode: 'direct' | 'any', tasks: number, inFlight: number, employees: number, capacity: number, timeoutMs: number): Promise<TasksResult> {
  const boss = await connectAndAuth(url, 'boss');
  const workers = await Promise.all(Array.from({ length: employees }, (_, i) => connectAndAuth(url, 'employee', `bench-tasks-${i}`, { tags: ['bench-tasks'], capacity })));
  const prefix = `${mode}${randomBytes(4).toString('hex')}-`;
  let sent = 0;
  let replies = 0;
  let startedAt = 0;
  const send = () => {
    const to = mode === 'any' ? 'any:bench-tasks' : workers[sent % employees]!.id;
    boss.ws.send(`{"type":"message","to":"${to}","queue":true,"payload":${PAYLOAD},"msg_id":"${prefix}${sent}"}`);
    sent++;
  };
  const run = new Promise<number>((resolve, reject) => {
    for (const worker of workers) {
      worker.ws.on('message', (data) => {
        const frame = parse(data);
        const error = errorOf(frame);
        if (error) return reject(error);
        if (frame.type !== 'message') return;
        worker.ws.send(`{"type":"message","to":"${String(frame.from_id)}","in_reply_to":${JSON.stringify(frame.msg_id)},"payload":{"ok":true}}`);
      });
      worker.ws.on('close', (code) => reject(new Error(`employee socket closed (${code}) mid-run`)));
    }
    boss.ws.on('message', (data) => {
      const frame = parse(data);
      const error = errorOf(frame);
      if (error) return reject(error);
      if (frame.type === 'delivery_ack' && (frame.failed as unknown[]).length > 0) return reject(new Error(`task failed: ${JSON.stringify(frame)}`));
      if (frame.type !== 'message' || frame.in_reply_to === undefined) return;
      replies++;
      if (replies === tasks) resolve(nowMs() - startedAt);
      else if (sent < tasks) send();
    });
    boss.ws.on('close', (code) => reject(new Error(`boss socket closed (${code}) mid-run`)));
    startedAt = nowMs();
    while (sent < Math.min(inFlight, tasks)) send();
  });
  try {
    const elapsedMs = await withTimeout(run, timeoutMs, `${mode} tasks run`);
    return { tasksPerSec: (tasks * 1000) / elapsedMs };
  } finally {
    closeAll([boss, ...workers]);
  }
}
