// Connecting and authenticating benchmark clients. The same code drives the relay and the
// ceiling, so any difference in the numbers comes from the server.

import WebSocket from 'ws';
import { BENCH_AUTHKEY } from './servers';
import { sleep, withTimeout } from './proc';

export interface AuthedSocket {
  ws: WebSocket;
  id: string;
}

type Frame = Record<string, unknown> & { type: string };

export class AuthRefused extends Error {
  constructor(readonly code: string, message: string) {
    super(`auth refused (${code}): ${message}`);
  }
}

/** Opens a socket, answers hello with auth, resolves on auth_ok. */
export function connectAndAuth(url: string, role: 'boss' | 'employee', name = 'bench', extra: Record<string, unknown> = {}): Promise<AuthedSocket> {
  const authFrame =
    role === 'boss'
      ? { type: 'auth', role, authkey: BENCH_AUTHKEY }
      : { type: 'auth', role, name, tags: ['bench'], ...extra };
  const attempt = new Promise<AuthedSocket>((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const fail = (error: Error) => {
      ws.removeAllListeners('message');
      ws.terminate();
      reject(error);
    };
    ws.on('error', fail);
    ws.on('close', (code) => fail(new Error(`socket closed (${code}) before auth_ok`)));
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame;
      if (frame.type === 'hello') ws.send(JSON.stringify(authFrame));
      else if (frame.type === 'auth_ok' && typeof frame.id === 'string') {
        ws.removeAllListeners('message');
        ws.removeAllListeners('close');
        ws.removeAllListeners('error');
        ws.on('error', () => ws.terminate());
        resolve({ ws, id: frame.id });
      } else if (frame.type === 'error') {
        fail(new AuthRefused(String(frame.code), String(frame.message)));
      }
    });
  });
  return withTimeout(attempt, 30_000, `${role} auth at ${url}`);
}

const RETRYABLE = new Set(['auth_throttled', 'server_full']);

/**
 * Authenticates `count` employees with at most `concurrency` handshakes in flight; given several
 * URLs (the nodes of a cluster), employee i connects to urls[i % urls.length].
 */
export async function connectEmployees(urls: string | string[], count: number, concurrency = 100): Promise<AuthedSocket[]> {
  const list = typeof urls === 'string' ? [urls] : urls;
  if (list.length === 0) throw new Error('connectEmployees needs at least one URL');
  const sockets: AuthedSocket[] = [];
  let next = 0;
  let retries = 0;
  const worker = async () => {
    while (next < count) {
      const index = next++;
      for (let attempt = 0; ; attempt++) {
        try {
          sockets.push(await connectAndAuth(list[index % list.length]!, 'employee', `bench-employee-${index}`));
          break;
        } catch (error) {
          const retryable = error instanceof AuthRefused && RETRYABLE.has(error.code);
          if (!retryable || attempt >= 50) throw error;
          retries++;
          await sleep(20 + attempt * 20);
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  } catch (error) {
    closeAll(sockets);
    throw error;
  }
  if (retries > 0) process.stderr.write(`  (${retries} auth retries after auth_throttled/server_full)\n`);
  return sockets;
}

export function closeAll(sockets: AuthedSocket[]): void {
  for (const socket of sockets) socket.ws.terminate();
}

/** Rejects the pending measurement when the server sends an error frame mid-run. */
export function errorOf(frame: Frame): Error | undefined {
  if (frame.type !== 'error') return undefined;
  return new Error(`server sent error ${String(frame.code)}: ${String(frame.message)}`);
}
