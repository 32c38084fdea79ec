// Helpers for the fault tests: the relay as a child process (so it can be killed with SIGKILL
// and its memory measured on its own), its resident set size, and a boss/employee pair that
// proves routing still works while something hostile is going on.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { ChildRelay, freePort } from './child-relay';
import { authBoss, authEmployee, type Authed, type RelayEndpoint } from './support';

export const CHILD_AUTHKEY = 'fault-test-key';

const CLI = path.join(__dirname, '..', 'cli.js');

export interface RelayProcess extends RelayEndpoint {
  child: ChildRelay;
  pid: number;
  /** Relay log lines (JSON) written to stderr so far. */
  logLines(): Record<string, unknown>[];
}

/** Spawns `node dist/cli.js <port> <authkey> <dir> --log-level warn …` (unless the extra args set a log level) and waits for its ready line. */
export async function startRelayProcess(dataDir: string, extraArgs: string[] = [], port?: number): Promise<RelayProcess> {
  const chosenPort = port ?? (await freePort());
  const logLevel = extraArgs.includes('--log-level') ? [] : ['--log-level', 'warn'];
  const args = [CLI, String(chosenPort), CHILD_AUTHKEY, dataDir, '--host', '127.0.0.1', ...logLevel, ...extraArgs];
  const child = new ChildRelay(process.execPath, args, { ...process.env, MIMICLAW_AUTHKEY: '' }, chosenPort);
  const url = await waitForReadyLine(child, 15_000);
  return {
    child,
    pid: child.child.pid!,
    url,
    httpUrl: child.httpUrl,
    logLines: () =>
      child.stderr
        .split('\n')
        .filter((line) => line.startsWith('{'))
        .map((line) => JSON.parse(line) as Record<string, unknown>),
  };
}

async function waitForReadyLine(child: ChildRelay, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let exit: unknown;
  void child.exited.then((e) => (exit = e), () => undefined);
  while (Date.now() < deadline) {
    const match = / ready: (ws:\/\/\S+)/.exec(child.stdout);
    if (match) return match[1]!;
    if (exit !== undefined) throw new Error(`relay exited (${JSON.stringify(exit)}) before its ready line; stderr: ${child.stderr}`);
    await sleep(20);
  }
  child.child.kill('SIGKILL');
  throw new Error(`relay printed no ready line within ${timeoutMs} ms; stderr: ${child.stderr}`);
}

/** VmRSS of a process from /proc, in bytes. */
export async function rssBytes(pid: number): Promise<number> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
  assert.ok(match, `no VmRSS in /proc/${pid}/status`);
  return Number(match[1]) * 1024;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns true; fails with `what` after the timeout. */
export async function eventually(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(25);
  }
  assert.fail(`timed out after ${timeoutMs} ms waiting until ${what}`);
}

export interface Pair {
  boss: Authed;
  employee: Authed;
  /** Round trips completed so far. */
  trips: number;
  /** Boss → employee and back; asserts the acks and the delivered frames. */
  roundTrip(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

/** A well-behaved boss/employee pair on the relay. */
export async function wellBehavedPair(relay: RelayEndpoint, authkey: string, name = 'Steady'): Promise<Pair> {
  const boss = await authBoss(relay, authkey);
  const employee = await authEmployee(relay, name, ['steady']);
  const pair: Pair = {
    boss,
    employee,
    trips: 0,
    async roundTrip(timeoutMs = 30_000) {
      const n = pair.trips;
      boss.socket.send({ type: 'message', to: employee.id, payload: { n }, msg_id: `${name}-out-${n}` });
      const out = await employee.socket.next('message', timeoutMs);
      assert.deepEqual(out.payload, { n });
      assert.deepEqual((await boss.socket.next('delivery_ack', timeoutMs)).delivered, [employee.id]);
      employee.socket.send({ type: 'message', to: boss.id, payload: { n }, msg_id: `${name}-back-${n}` });
      const back = await boss.socket.next('message', timeoutMs);
      assert.deepEqual(back.payload, { n });
      assert.deepEqual((await employee.socket.next('delivery_ack', timeoutMs)).delivered, [boss.id]);
      pair.trips++;
    },
    async close() {
      await Promise.all([boss.socket.close(), employee.socket.close()]);
    },
  };
  return pair;
}
