// The admin read an operator's dashboard makes: GET /api/admin/workforce with N employees
// connected, one request at a time, timed from the request to the last byte of the answer.
// A boss's ping frames run alongside, so the table also shows how long the relay's other
// clients wait while it answers.

import http from 'node:http';
import { closeAll, connectAndAuth, connectEmployees, type AuthedSocket } from './load-client';
import { nowMs, withTimeout } from './proc';
import { percentile } from './stats';

export interface AdminResult {
  requestP50Ms: number;
  requestP99Ms: number;
  /** Server CPU per request: steadier than wall time on a machine doing other work. */
  serverCpuMsPerRequest: number;
  bodyKb: number;
  /** Round trips of a boss's ping frames sent while the requests ran. */
  pingP99Ms: number;
}

function get(port: number, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let bytes = 0;
      res.on('data', (chunk: Buffer) => (bytes += chunk.length));
      res.on('end', () => (res.statusCode === 200 ? resolve(bytes) : reject(new Error(`${path} answered ${res.statusCode}`))));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

/** Pings the relay with app-level ping frames, one at a time, until stopped. */
function pingLoop(boss: AuthedSocket): { stop(): number[] } {
  const times: number[] = [];
  let running = true;
  let sentAt = 0;
  const send = () => {
    sentAt = nowMs();
    boss.ws.send('{"type":"ping"}');
  };
  boss.ws.on('message', (data) => {
    if (!String(data).includes('"pong"')) return;
    times.push(nowMs() - sentAt);
    if (running) setTimeout(send, 1);
  });
  send();
  return {
    stop() {
      running = false;
      return times;
    },
  };
}

export async function runAdmin(url: string, employees: number, requests: number, timeoutMs: number, serverCpuMs: () => number): Promise<AdminResult> {
  const port = Number(new URL(url).port);
  let sockets: AuthedSocket[] = [];
  try {
    sockets = await connectEmployees(url, employees);
    const boss = await connectAndAuth(url, 'boss');
    sockets.push(boss);
    await get(port, '/api/admin/workforce'); // warm-up
    const pings = pingLoop(boss);
    const times: number[] = [];
    let bytes = 0;
    const cpuBefore = serverCpuMs();
    await withTimeout(
      (async () => {
        for (let i = 0; i < requests; i++) {
          const startedAt = nowMs();
          bytes = await get(port, '/api/admin/workforce');
          times.push(nowMs() - startedAt);
        }
      })(),
      timeoutMs,
      'admin workforce requests',
    );
    const cpuUsed = serverCpuMs() - cpuBefore;
    const pingTimes = pings.stop();
    return {
      requestP50Ms: percentile(times, 50),
      requestP99Ms: percentile(times, 99),
      // Includes answering the pings that ran alongside: a small share.
      serverCpuMsPerRequest: cpuUsed / requests,
      bodyKb: bytes / 1024,
      pingP99Ms: percentile(pingTimes, 99),
    };
  } finally {
    closeAll(sockets);
  }
}
