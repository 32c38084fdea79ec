// `mimiclaw-ws connect` and `mimiclaw-ws send` as child processes against a real relay: what
// they print, what they send, and their exit codes (0 ok, 1 failed, 2 bad arguments).

import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { authEmployee, startTestRelay, TEST_AUTHKEY, type Frame, type TestRelay } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

interface Finished {
  code: number | null;
  stdout: string;
  stderr: string;
}

interface Running {
  child: ChildProcessWithoutNullStreams;
  done: Promise<Finished>;
  /** The first stdout JSON line that passes `accept`. */
  line(accept: (frame: Frame) => boolean, timeoutMs?: number): Promise<Frame>;
}

function run(args: string[], env: NodeJS.ProcessEnv = {}, stdin: 'pipe' | 'ignore' = 'pipe'): Running {
  const child = spawn(process.execPath, [CLI, ...args], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env },
    stdio: [stdin, 'pipe', 'pipe'],
  }) as ChildProcessWithoutNullStreams;
  let stdout = '';
  let stderr = '';
  const watchers: (() => void)[] = [];
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    for (const watch of [...watchers]) watch();
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const done = new Promise<Finished>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  const line = (accept: (frame: Frame) => boolean, timeoutMs = 10_000) =>
    new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        remove();
        reject(new Error(`timed out waiting for a stdout line; stdout so far: ${stdout.slice(-500)} stderr: ${stderr.slice(-500)}`));
      }, timeoutMs);
      const check = () => {
        const found = jsonLines(stdout).find(accept);
        if (!found) return;
        clearTimeout(timer);
        remove();
        resolve(found);
      };
      const remove = () => watchers.splice(watchers.indexOf(check) >>> 0, 1);
      watchers.push(check);
      check();
    });
  return { child, done, line };
}

function jsonLines(text: string): Frame[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Frame);
}

async function finish(running: Running, timeoutMs = 15_000): Promise<Finished> {
  const timer = setTimeout(() => running.child.kill('SIGKILL'), timeoutMs);
  const result = await running.done;
  clearTimeout(timer);
  return result;
}

describe('mimiclaw-ws connect / send', () => {
  let env: TestRelay;
  before(async () => {
    env = await startTestRelay();
  });
  after(async () => {
    await env.dispose();
  });

  test('an employee on `connect` prints the message that `send` delivers; both exit 0', async () => {
    const employee = run(['connect', env.relay.url, '--role', 'employee', '--name', 'Shell-1', '--tags', 'shell, ops']);
    try {
      const ok = await employee.line((f) => f.type === 'auth_ok');
      assert.deepEqual(ok.tags, ['shell', 'ops']);
      const sent = await finish(run(['send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', String(ok.id), '--payload', '{"task":"deploy"}']));
      assert.equal(sent.code, 0, sent.stderr);
      const ack = JSON.parse(sent.stdout) as Frame;
      assert.equal(ack.type, 'delivery_ack');
      assert.deepEqual(ack.delivered, [ok.id]);
      const message = await employee.line((f) => f.type === 'message');
      assert.deepEqual(message.payload, { task: 'deploy' });
      assert.equal(message.msg_id, ack.msg_id);
      const byTag = await finish(run(['send', env.relay.url, '--to', 'tag:ops', '--payload', '"by tag"'], { MIMICLAW_AUTHKEY: TEST_AUTHKEY }));
      assert.equal(byTag.code, 0, byTag.stderr);
      assert.equal((await employee.line((f) => f.payload === 'by tag')).to, ok.id);
    } finally {
      employee.child.kill('SIGTERM');
    }
    const ended = await finish(employee);
    assert.equal(ended.code, 0, ended.stderr);
  });

  test('an employee `connect` with no standard input (a service) registers and stays connected until a signal', async () => {
    const employee = run(['connect', env.relay.url, '--role', 'employee', '--name', 'Service-1', '--tags', 'svc'], {}, 'ignore');
    try {
      const ok = await employee.line((f) => f.type === 'auth_ok');
      // Still connected after its input ended: a message sent now reaches it.
      const sent = await finish(run(['send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', String(ok.id), '--payload', '"still there?"']));
      assert.equal(sent.code, 0, sent.stderr);
      assert.equal((await employee.line((f) => f.type === 'message')).payload, 'still there?');
      assert.equal(employee.child.exitCode, null, 'the employee session is still running');
    } finally {
      employee.child.kill('SIGTERM');
    }
    const ended = await finish(employee);
    assert.equal(ended.code, 0, ended.stderr);
  });

  test('`connect` sends each stdin line, reports bad lines on stderr and keeps going, and exits 0 at end of input', async () => {
    const worker = await authEmployee(env.relay, 'Listener', ['listen']);
    const boss = run(['connect', env.relay.url, '--role', 'boss', '--authkey', TEST_AUTHKEY]);
    boss.child.stdin.write(`{"to":"${worker.id}","payload":{"n":1}}\n`);
    boss.child.stdin.write('this is not json\n');
    boss.child.stdin.write('{"payload":"no target"}\n');
    boss.child.stdin.end(`{"to":"${worker.id}","payload":{"n":2},"msg_id":"shell-2"}\n`);
    const result = await finish(boss);
    assert.equal(result.code, 0, result.stderr);
    const acks = jsonLines(result.stdout).filter((f) => f.type === 'delivery_ack');
    assert.equal(acks.length, 2, 'acks of both good lines were awaited before exiting');
    assert.deepEqual(acks.map((a) => a.delivered), [[worker.id], [worker.id]]);
    assert.equal(acks[1]!.msg_id, 'shell-2');
    const errors = jsonLines(result.stderr).filter((f) => f.event === 'error') as unknown as { line: number; error: { code: string } }[];
    assert.deepEqual(errors.map((e) => [e.line, e.error.code]), [[2, 'invalid_input'], [3, 'invalid_input']]);
    assert.deepEqual((await worker.socket.next('message')).payload, { n: 1 });
    assert.deepEqual((await worker.socket.next('message')).payload, { n: 2 });
    await worker.socket.close();
  });

  test('`connect` exits 0 on SIGINT, 1 when the relay refuses its auth for good or a send is never acknowledged', async () => {
    const listening = run(['connect', env.relay.url, '--role', 'boss', '--authkey', TEST_AUTHKEY, '--keep-open']);
    await listening.line((f) => f.type === 'auth_ok');
    listening.child.kill('SIGINT');
    assert.equal((await finish(listening)).code, 0);

    const refused = await finish(run(['connect', env.relay.url, '--role', 'boss', '--authkey', 'wrong', '--keep-open']));
    assert.equal(refused.code, 1);
    assert.equal(jsonLines(refused.stdout).find((f) => f.type === 'error')?.code, 'invalid_authkey');
    assert.match(refused.stderr, /invalid_authkey/);

    const spare = await startTestRelay();
    const deadUrl = spare.relay.url;
    await spare.dispose();
    const stranded = run(['connect', deadUrl, '--role', 'boss', '--authkey', TEST_AUTHKEY, '--drain-timeout', '300ms']);
    stranded.child.stdin.end('{"to":"*","payload":"nobody hears this"}\n');
    const result = await finish(stranded);
    assert.equal(result.code, 1, 'a send that was never acknowledged makes the exit code 1');
    const lost = jsonLines(result.stderr).find((f) => f.event === 'error' && f.line === 1) as unknown as { error: { code: string } } | undefined;
    assert.equal(lost?.error.code, 'closed');
  });

  test('`send` exits 1 when the message failed, was refused, or the relay is unreachable', async () => {
    const unknown = await finish(run(['send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', 'employee-nobody', '--payload', '1']));
    assert.equal(unknown.code, 1);
    assert.deepEqual((JSON.parse(unknown.stdout) as Frame).failed, [{ id: 'employee-nobody', reason: 'target_not_found' }]);
    assert.match(unknown.stderr, /target_not_found/);

    const wrongKey = await finish(run(['send', env.relay.url, '--authkey', 'wrong', '--to', '*', '--payload', '1']));
    assert.equal(wrongKey.code, 1);
    assert.match(wrongKey.stderr, /invalid_authkey/);

    const spare = await startTestRelay();
    const deadUrl = spare.relay.url;
    await spare.dispose();
    const unreachable = await finish(run(['send', deadUrl, '--authkey', TEST_AUTHKEY, '--to', '*', '--payload', '1', '--timeout', '300ms']));
    assert.equal(unreachable.code, 1);
    assert.match(unreachable.stderr, /could not connect/);
  });

  test('`send --queue` to an offline known employee exits 0 with it queued', async () => {
    const worker = await authEmployee(env.relay, 'Sleeper', ['sleep']);
    await worker.socket.close();
    const queued = await finish(run(['send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', worker.id, '--payload', '{"later":true}', '--queue']));
    assert.equal(queued.code, 0, queued.stderr);
    assert.deepEqual((JSON.parse(queued.stdout) as Frame).queued, [worker.id]);
    const offline = await finish(run(['send', env.relay.url, '--authkey', TEST_AUTHKEY, '--to', worker.id, '--payload', '1']));
    assert.equal(offline.code, 1, 'without --queue an offline target is a failure');
  });

  test('bad arguments exit 2 with a usage line; --help exits 0', async () => {
    const url = env.relay.url;
    const bad: string[][] = [
      ['send', url, '--authkey', TEST_AUTHKEY, '--payload', '1'],
      ['send', url, '--authkey', TEST_AUTHKEY, '--to', '*'],
      ['send', url, '--authkey', TEST_AUTHKEY, '--to', '*', '--payload', '{not json'],
      ['send', 'http://127.0.0.1:1/ws', '--authkey', TEST_AUTHKEY, '--to', '*', '--payload', '1'],
      ['send', url, '--to', '*', '--payload', '1'],
      ['send', url, '--authkey', TEST_AUTHKEY, '--to', '*', '--payload', '1', '--bogus'],
      ['send', url, '--authkey', TEST_AUTHKEY, '--to', '*', '--payload', '1', '--timeout', 'soon'],
      ['connect', url, '--authkey', TEST_AUTHKEY],
      ['connect', url, '--role', 'employee', '--name', 'NoTags'],
      ['connect'],
    ];
    for (const args of bad) {
      const result = await finish(run(args));
      assert.equal(result.code, 2, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^mimiclaw-ws (send|connect): .+\nusage: mimiclaw-ws (send|connect) /, args.join(' '));
      assert.equal(result.stdout, '');
    }
    for (const command of ['send', 'connect']) {
      const help = await finish(run([command, '--help']));
      assert.equal(help.code, 0);
      assert.match(help.stdout, new RegExp(`^usage: mimiclaw-ws ${command} <ws-url>`));
    }
  });
});
