// Dispatch from RelayClient and the shell: request() resolving with the reply, reply() and
// done() for employees, setAvailability(), and `mimiclaw-ws send --wait-reply` / a `connect`
// employee answering tasks from stdin.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';
import { RelayClient, RelayClientError } from '../client';
import { startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

async function withRelay(fn: (t: TestRelay) => Promise<void>): Promise<void> {
  const t = await startTestRelay();
  try {
    await fn(t);
  } finally {
    await t.dispose();
  }
}

function employee(t: TestRelay, name: string, tags: string[], capacity?: number): RelayClient {
  return new RelayClient({ url: t.relay.url, role: 'employee', name, tags, heartbeatIntervalMs: 0, ...(capacity !== undefined && { capacity }) });
}

test('request() resolves with the reply; reply() and done() end tasks; failures reject with task_failed or timeout', async () => {
  await withRelay(async (t) => {
    const boss = new RelayClient({ url: t.relay.url, role: 'boss', authkey: TEST_AUTHKEY, heartbeatIntervalMs: 0 });
    const worker = employee(t, 'Researcher', ['research'], 2);
    try {
      await Promise.all([boss.connect(), worker.connect()]);
      worker.on('message', (task) => {
        if (task.dispatch === undefined) return;
        const { n } = task.payload as { n: number };
        if (n === 3) worker.done(task);
        else if (n === 4) return; // never answered: its lease runs out
        else void worker.reply(task, { doubled: n * 2 });
      });
      const replies = await Promise.all([boss.request('any:research', { n: 1 }), boss.request('any:research', { n: 2 }, { priority: 'high' })]);
      assert.deepEqual(replies.map((r) => r.payload), [{ doubled: 2 }, { doubled: 4 }]);
      assert.ok(replies.every((r) => r.from_id === worker.identity!.id && typeof r.in_reply_to === 'string'));

      const ack = await worker.setAvailability({ status: 'dnd' });
      assert.deepEqual([ack.status, ack.capacity, ack.in_progress], ['dnd', 2, 0]);
      await assert.rejects(boss.request('any:research', { n: 5 }), (error: RelayClientError) => error.code === 'task_failed' && /no_available_target/.test(error.message));
      await worker.setAvailability({ status: 'idle' });

      // done() without a reply: the boss sees the task done, and a request waiting on it times out.
      const done = new Promise((resolve) => boss.on('delivery_update', (u) => u.status === 'done' && resolve(u.msg_id)));
      await assert.rejects(boss.request('any:research', { n: 3 }, { msgId: 'no-reply', timeoutMs: 300 }), (error: RelayClientError) => error.code === 'timeout');
      assert.equal(await done, 'no-reply');
      await assert.rejects(
        boss.request('any:research', { n: 4 }, { taskTimeoutMs: 50 }),
        (error: RelayClientError) => error.code === 'task_failed',
      );
    } finally {
      await Promise.all([boss.close(), worker.close()]);
    }
  });
});

interface Finished {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[], stdin?: (write: (line: string) => void, stdout: () => string) => void): { done: Promise<Finished>; kill: () => void } {
  const child = spawn(process.execPath, [CLI, ...args], { env: { PATH: process.env.PATH, HOME: process.env.HOME } });
  let stdout = '';
  let stderr = '';
  const watchers: (() => void)[] = [];
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    for (const watch of watchers) watch();
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  if (stdin) {
    const write = (line: string) => child.stdin.write(line + '\n');
    const check = () => stdin(write, () => stdout);
    watchers.push(check);
  }
  return {
    done: new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr }))),
    kill: () => child.kill('SIGTERM'),
  };
}

test('from the shell: an employee under `connect` answers tasks from stdin, and `send --to any:x --wait-reply` prints the reply', async () => {
  await withRelay(async (t) => {
    const answered = new Set<string>();
    // The employee answers each task it prints with a reply line carrying in_reply_to.
    const worker = cli(['connect', t.relay.url, '--role', 'employee', '--name', 'Shell', '--tags', 'shell', '--capacity', '2', '--keep-open'], (write, stdout) => {
      for (const line of stdout().split('\n')) {
        if (!line.startsWith('{')) continue;
        const frame = JSON.parse(line) as Record<string, unknown>;
        if (frame.type !== 'message' || frame.dispatch !== 'any:shell' || answered.has(String(frame.msg_id))) continue;
        answered.add(String(frame.msg_id));
        write(JSON.stringify({ to: frame.from_id, in_reply_to: frame.msg_id, payload: { echo: frame.payload } }));
      }
    });
    try {
      // Wait until the employee is online before sending (otherwise: no_available_target).
      for (let i = 0; i < 200; i++) {
        const body = (await (await fetch(`${t.relay.httpUrl}/api/admin/workforce?tag=shell`)).json()) as { summary: { online_count: number } };
        if (body.summary.online_count === 1) break;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const sent = await cli(['send', t.relay.url, '--authkey', TEST_AUTHKEY, '--to', 'any:shell', '--payload', '{"q":"hi"}', '--wait-reply', '--priority', 'high', '--timeout', '20s']).done;
      assert.equal(sent.code, 0, sent.stderr);
      const reply = JSON.parse(sent.stdout.trim()) as Record<string, unknown>;
      assert.equal(reply.type, 'message');
      assert.deepEqual(reply.payload, { echo: { q: 'hi' } });
      assert.equal(typeof reply.in_reply_to, 'string');

      const failed = await cli(['send', t.relay.url, '--authkey', TEST_AUTHKEY, '--to', 'any:nobody', '--payload', '1', '--wait-reply']).done;
      assert.equal(failed.code, 1);
      assert.match(failed.stderr, /task_failed.*no_available_target/);
      const bad = await cli(['send', t.relay.url, '--authkey', TEST_AUTHKEY, '--to', 'any:shell', '--payload', '1', '--priority', 'urgent']).done;
      assert.equal(bad.code, 2);
    } finally {
      worker.kill();
      await worker.done;
    }
  });
});
