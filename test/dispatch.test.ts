// Dispatch (PROTOCOL.md part C): `any:<tag>` targets, availability, leases and retries,
// priority, replies, and tasks surviving a restart.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { authBoss, authEmployee, http, reconnect, singleRelayOnly, startTestRelay, type Authed, type Frame, type TestRelay } from './support';

async function withRelay(fn: (t: TestRelay) => Promise<void>, overrides: Parameters<typeof startTestRelay>[0] = {}): Promise<void> {
  const t = await startTestRelay(overrides);
  try {
    await fn(t);
  } finally {
    await t.dispose();
  }
}

const update = (msgId: string, status: string) => (f: Frame) => f.type === 'delivery_update' && f.msg_id === msgId && f.status === status;

/** An employee with a status_ack behind it, so the relay has applied the status before the test goes on. */
async function setStatus(who: Authed, fields: Record<string, unknown>): Promise<Frame> {
  who.socket.send({ type: 'status', ...fields });
  return who.socket.next('status_ack');
}

test('any:<tag> goes to one employee, the reply comes back with in_reply_to, and the boss sees assigned and done', async () => {
  await withRelay(async ({ relay }) => {
    const boss = await authBoss(relay);
    const a = await authEmployee(relay, 'A', ['research']);
    const b = await authEmployee(relay, 'B', ['research']);
    const other = await authEmployee(relay, 'C', ['billing']);

    boss.socket.send({ type: 'message', to: 'any:research', payload: { task: 1 }, msg_id: 't1' });
    const ack = await boss.socket.next('delivery_ack');
    assert.equal((ack.delivered as string[]).length, 1);
    assert.deepEqual([ack.failed, ack.queued], [[], []]);
    const chosen = (ack.delivered as string[])[0]!;
    assert.ok(chosen === a.id || chosen === b.id);
    const first = chosen === a.id ? a : b;
    const second = chosen === a.id ? b : a;
    const task = await first.socket.next('message');
    assert.equal(task.msg_id, 't1');
    assert.equal(task.to, first.id);
    assert.equal(task.dispatch, 'any:research');
    assert.equal(task.attempt, 1);
    assert.deepEqual(task.payload, { task: 1 });
    const assigned = await boss.socket.next(update('t1', 'assigned'));
    assert.equal(assigned.id, first.id);

    // The same msg_id again is a duplicate: the first ack, and no second task.
    boss.socket.send({ type: 'message', to: 'any:research', payload: { task: 1 }, msg_id: 't1' });
    const repeat = await boss.socket.next('delivery_ack');
    assert.deepEqual([repeat.duplicate, repeat.delivered], [true, [chosen]]);

    // The second task goes to the employee with fewer tasks in progress.
    boss.socket.send({ type: 'message', to: 'any:research', payload: { task: 2 }, msg_id: 't2' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [second.id]);
    assert.equal((await second.socket.next('message')).msg_id, 't2');

    assert.equal(first.socket.frames.filter((f) => f.type === 'message').length, 0, 'the duplicate was not handed out again');
    first.socket.send({ type: 'message', to: boss.id, in_reply_to: 't1', payload: { answer: 42 } });
    const reply = await boss.socket.next((f) => f.type === 'message' && f.in_reply_to === 't1');
    assert.deepEqual(reply.payload, { answer: 42 });
    assert.equal(reply.from_id, first.id);
    assert.equal((await boss.socket.next(update('t1', 'done'))).id, first.id);
    second.socket.send({ type: 'task_done', msg_id: 't2' });
    assert.equal((await boss.socket.next(update('t2', 'done'))).id, second.id);
    // Answering twice is refused: the task is no longer in progress there.
    second.socket.send({ type: 'task_done', msg_id: 't2' });
    const again = await second.socket.next('error');
    assert.equal(again.code, 'task_not_found');
    assert.equal(other.socket.frames.filter((f) => f.type === 'message').length, 0);
  });
});

test('with nobody free: no_available_target, or with queue the task waits and goes to the first employee free, by priority', async () => {
  await withRelay(async ({ relay }) => {
    const boss = await authBoss(relay);
    boss.socket.send({ type: 'message', to: 'any:ops', payload: 1, msg_id: 'none' });
    const failed = await boss.socket.next('delivery_ack');
    assert.deepEqual(failed.failed, [{ id: 'any:ops', reason: 'no_available_target' }]);
    assert.deepEqual(failed.delivered, []);

    for (const [msgId, priority] of [['low-1', 'low'], ['n-1', 'normal'], ['high-1', 'high'], ['n-2', undefined], ['high-2', 'high']] as const) {
      boss.socket.send({ type: 'message', to: 'any:ops', payload: msgId, msg_id: msgId, queue: true, ...(priority && { priority }) });
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual(ack.queued, ['any:ops']);
    }
    const { body } = await http(relay, 'GET', '/api/admin/tasks');
    assert.deepEqual((body.tags as Record<string, unknown>).ops, { waiting: 5, in_progress: 0 });

    const worker = await authEmployee(relay, 'Ops', ['ops']);
    const order: unknown[] = [];
    for (let i = 0; i < 5; i++) {
      const task = await worker.socket.next('message');
      order.push(task.msg_id);
      worker.socket.send({ type: 'task_done', msg_id: task.msg_id });
    }
    assert.deepEqual(order, ['high-1', 'high-2', 'n-1', 'n-2', 'low-1']);
  });
});

test('capacity, working and dnd decide who is available; direct messages still arrive', async () => {
  await withRelay(async ({ relay }) => {
    const boss = await authBoss(relay);
    const worker = await authEmployee(relay, 'Busy', ['x'], { capacity: 2 });
    const ack = await setStatus(worker, { status: 'working' });
    assert.deepEqual([ack.status, ack.capacity, ack.in_progress, ack.id], ['working', 2, 0, worker.id]);

    boss.socket.send({ type: 'message', to: 'any:x', payload: 'n', msg_id: 'normal' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'any:x', reason: 'no_available_target' }]);
    boss.socket.send({ type: 'message', to: 'any:x', payload: 'h', msg_id: 'high', priority: 'high' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [worker.id]);
    const high = await worker.socket.next('message');
    assert.equal(high.priority, 'high');

    await setStatus(worker, { status: 'dnd' });
    boss.socket.send({ type: 'message', to: 'any:x', payload: 'h2', msg_id: 'high-2', priority: 'high' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'any:x', reason: 'no_available_target' }]);
    boss.socket.send({ type: 'message', to: worker.id, payload: 'direct', msg_id: 'direct' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [worker.id]);
    assert.equal((await worker.socket.next('message')).msg_id, 'direct');

    // Capacity is a hard cap: one in progress and capacity 1 leaves no room even for high.
    const capped = await setStatus(worker, { status: 'idle', capacity: 1 });
    assert.deepEqual([capped.status, capped.capacity, capped.in_progress], ['idle', 1, 1]);
    boss.socket.send({ type: 'message', to: 'any:x', payload: 'h3', msg_id: 'high-3', priority: 'high' });
    assert.deepEqual((await boss.socket.next('delivery_ack')).failed, [{ id: 'any:x', reason: 'no_available_target' }]);

    worker.socket.send({ type: 'status', status: 'asleep' });
    assert.equal((await worker.socket.next('error')).code, 'invalid_status');
    worker.socket.send({ type: 'status', capacity: 0 });
    assert.equal((await worker.socket.next('error')).code, 'invalid_capacity');
    boss.socket.send({ type: 'status', status: 'idle' });
    assert.equal((await boss.socket.next('error')).code, 'invalid_status');
    boss.socket.send({ type: 'message', to: 'any:x', payload: 1, priority: 'urgent', msg_id: 'bad' });
    const bad = await boss.socket.next('error');
    assert.deepEqual([bad.code, bad.msg_id], ['invalid_frame', 'bad']);
  });
});

test('an unanswered lease goes to another employee with attempt 2, and fails after --max-attempts', async () => {
  await withRelay(
    async ({ relay }) => {
      const boss = await authBoss(relay);
      const a = await authEmployee(relay, 'A', ['slow']);
      boss.socket.send({ type: 'message', to: 'any:slow', payload: 'p', msg_id: 'lease', task_timeout_ms: 150 });
      assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
      assert.equal((await a.socket.next('message')).attempt, 1);
      const b = await authEmployee(relay, 'B', ['slow']);
      const second = await b.socket.next('message');
      assert.deepEqual([second.msg_id, second.attempt], ['lease', 2]);
      assert.equal((await boss.socket.next((f) => f.type === 'delivery_update' && f.status === 'assigned' && f.attempt === 2)).id, b.id);
      // B gives up: the last attempt goes back to A (free again), then it fails for good.
      b.socket.send({ type: 'task_done', msg_id: 'lease', failed: true });
      const third = await a.socket.next('message');
      assert.equal(third.attempt, 3);
      const failed = await boss.socket.next(update('lease', 'failed'), 5000);
      assert.equal(failed.id, 'any:slow');
      // A reply after the lease ended is still forwarded, but changes nothing.
      a.socket.send({ type: 'message', to: boss.id, in_reply_to: 'lease', payload: 'late' });
      assert.equal((await boss.socket.next((f) => f.type === 'message' && f.in_reply_to === 'lease')).payload, 'late');
      const { body } = await http(relay, 'GET', '/api/admin/tasks');
      assert.deepEqual(body.tasks, []);
    },
    { maxAttempts: 3 },
  );
});

test('an employee that disconnects or is banned loses its tasks to the others', async () => {
  await withRelay(async ({ relay }) => {
    const boss = await authBoss(relay);
    const a = await authEmployee(relay, 'A', ['w']);
    boss.socket.send({ type: 'message', to: 'any:w', payload: 1, msg_id: 'd1' });
    await a.socket.next('message');
    await boss.socket.next(update('d1', 'assigned'));
    const b = await authEmployee(relay, 'B', ['w'], { capacity: 1 });
    await a.socket.close();
    const moved = await b.socket.next('message');
    assert.deepEqual([moved.msg_id, moved.attempt], ['d1', 2]);
    const c = await authEmployee(relay, 'C', ['w']);
    await http(relay, 'POST', `/api/employees/${b.id}/ban`, { authkey: 'test-secret' });
    const again = await c.socket.next('message');
    assert.deepEqual([again.msg_id, again.attempt], ['d1', 3]);
  });
});

test('waiting and in-progress tasks survive a restart; in-progress ones are dispatched again at once', async () => {
  const t = await startTestRelay();
  let current = t;
  try {
    const boss = await authBoss(t.relay);
    const a = await authEmployee(t.relay, 'A', ['keep']);
    boss.socket.send({ type: 'message', to: 'any:keep', payload: 'first', msg_id: 'k1' });
    await boss.socket.next('delivery_ack');
    await a.socket.next('message');
    boss.socket.send({ type: 'message', to: 'any:keep', payload: 'second', msg_id: 'k2', queue: true });
    assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:keep']);
    current = await t.restart();
    const again = await reconnect(current.relay, a, 'employee');
    assert.equal(again.ok.type, 'auth_ok');
    const redo = await again.socket.next('message');
    assert.deepEqual([redo.msg_id, redo.attempt, redo.payload], ['k1', 2, 'first']);
    again.socket.send({ type: 'task_done', msg_id: 'k1' });
    const next = await again.socket.next('message');
    assert.deepEqual([next.msg_id, next.attempt], ['k2', 1]);
  } finally {
    await current.dispose();
  }
});

/** Reads /api/events until every wanted event type has been seen; returns the events' data. */
async function sseUntil(httpUrl: string, wanted: string[], start: () => Promise<void>): Promise<Record<string, Record<string, unknown>[]>> {
  const controller = new AbortController();
  const response = await fetch(`${httpUrl}/api/events`, { signal: controller.signal });
  const reader = response.body!.getReader();
  const seen: Record<string, Record<string, unknown>[]> = {};
  let text = '';
  await start();
  const decoder = new TextDecoder();
  const deadline = setTimeout(() => controller.abort(), 10_000);
  try {
    while (!wanted.every((type) => seen[type])) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      let end: number;
      while ((end = text.indexOf('\n\n')) >= 0) {
        const block = text.slice(0, end);
        text = text.slice(end + 2);
        const type = /^event: (.+)$/m.exec(block)?.[1];
        const data = /^data: (.+)$/m.exec(block)?.[1];
        if (type && data) (seen[type] ??= []).push(JSON.parse(data) as Record<string, unknown>);
      }
    }
  } finally {
    clearTimeout(deadline);
    controller.abort();
  }
  return seen;
}

test('admin views: /api/admin/tasks, the workforce dispatch field, task events on /api/events and dispatch metrics', singleRelayOnly('reads /metrics, which is per node (with a node label) in a cluster; test/cluster-dispatch.test.ts checks the cluster-wide admin views'), async () => {
  await withRelay(
    async ({ relay }) => {
      const boss = await authBoss(relay);
      const a = await authEmployee(relay, 'A', ['desk'], { capacity: 2 });
      await setStatus(a, { status: 'working' });
      const events = await sseUntil(relay.httpUrl, ['availability', 'task_assigned', 'task_done', 'task_retried', 'task_failed'], async () => {
        boss.socket.send({ type: 'message', to: 'any:desk', payload: 1, msg_id: 'h', priority: 'high', task_timeout_ms: 60_000 });
        assert.deepEqual((await boss.socket.next('delivery_ack')).delivered, [a.id]);
        await a.socket.next('message');
        boss.socket.send({ type: 'message', to: 'any:desk', payload: 2, msg_id: 'w', queue: true });
        assert.deepEqual((await boss.socket.next('delivery_ack')).queued, ['any:desk']);

        const { body: tasks } = await http(relay, 'GET', '/api/admin/tasks');
        assert.deepEqual(tasks.tags, { desk: { waiting: 1, in_progress: 1 } });
        const list = tasks.tasks as Record<string, unknown>[];
        assert.deepEqual(
          list.map((t) => [t.msg_id, t.status, t.employee_id, t.attempt, t.priority, t.target, t.from_id]),
          [
            ['h', 'in_progress', a.id, 1, 'high', 'any:desk', boss.id],
            ['w', 'waiting', null, 0, 'normal', 'any:desk', boss.id],
          ],
        );
        assert.ok(list.every((t) => typeof t.age_ms === 'number' && t.age_ms >= 0));
        const { body: force } = await http(relay, 'GET', '/api/admin/workforce');
        const node = (force.employees as Record<string, unknown>[]).find((e) => e.id === a.id)!;
        assert.deepEqual(node.dispatch, { status: 'working', capacity: 2, in_progress: 1 });
        const metrics = await (await fetch(`${relay.httpUrl}/metrics`)).text();
        assert.match(metrics, /^mimiclaw_dispatch_queue_depth\{tag="desk"\} 1$/m);
        assert.match(metrics, /^mimiclaw_dispatch_in_progress\{tag="desk"\} 1$/m);
        assert.match(metrics, /^mimiclaw_dispatch_wait_seconds_count\{tag="desk"\} 1$/m);

        a.socket.send({ type: 'message', to: boss.id, in_reply_to: 'h', payload: 'ok' });
        await boss.socket.next(update('h', 'done'));
        await setStatus(a, { status: 'idle' });
        const w = await a.socket.next('message');
        assert.equal(w.msg_id, 'w');
        a.socket.send({ type: 'task_done', msg_id: 'w', failed: true });
        assert.equal((await a.socket.next('message')).attempt, 2);
        a.socket.send({ type: 'task_done', msg_id: 'w', failed: true });
        await boss.socket.next(update('w', 'failed'));
      });
      assert.deepEqual(
        events.task_assigned!.map((e) => [e.msg_id, e.employee_id, e.attempt, e.target]),
        [
          ['h', a.id, 1, 'any:desk'],
          ['w', a.id, 1, 'any:desk'],
          ['w', a.id, 2, 'any:desk'],
        ],
      );
      assert.deepEqual(events.task_done!.map((e) => e.msg_id), ['h']);
      assert.deepEqual(events.availability!.map((e) => [(e.node as { id: string }).id, e.status, e.capacity]), [[a.id, 'idle', 2]]);
      assert.deepEqual(events.task_retried!.map((e) => [e.msg_id, e.reason, e.attempt, e.employee_id]), [['w', 'failed', 1, a.id]]);
      assert.deepEqual(events.task_failed!.map((e) => [e.msg_id, e.reason, e.attempt]), [['w', 'max_attempts', 2]]);
    },
    { maxAttempts: 2 },
  );
});

test('priority orders a target\'s store-and-forward queue too, and the order survives a restart', async () => {
  const t = await startTestRelay();
  let current = t;
  try {
    const boss = await authBoss(t.relay);
    const worker = await authEmployee(t.relay, 'Away', ['away']);
    await worker.socket.close();
    const sends = [['l1', 'low'], ['n1', undefined], ['h1', 'high'], ['n2', 'normal'], ['h2', 'high'], ['l2', 'low']] as const;
    for (const [msgId, priority] of sends) {
      boss.socket.send({ type: 'message', to: worker.id, payload: msgId, msg_id: msgId, queue: true, ...(priority && { priority }) });
      assert.deepEqual((await boss.socket.next('delivery_ack')).queued, [worker.id]);
    }
    current = await t.restart();
    const back = await reconnect(current.relay, worker, 'employee');
    const order: unknown[] = [];
    for (let i = 0; i < sends.length; i++) order.push((await back.socket.next('message')).msg_id);
    assert.deepEqual(order, ['h1', 'h2', 'n1', 'n2', 'l1', 'l2']);
  } finally {
    await current.dispose();
  }
});

test('--task-timeout is the lease of a task that gives no task_timeout_ms', async () => {
  await withRelay(
    async ({ relay }) => {
      const boss = await authBoss(relay);
      const a = await authEmployee(relay, 'A', ['t']);
      boss.socket.send({ type: 'message', to: 'any:t', payload: 1, msg_id: 'default-lease' });
      assert.equal((await a.socket.next('message')).attempt, 1);
      const again = await a.socket.next('message');
      assert.deepEqual([again.msg_id, again.attempt], ['default-lease', 2]);
      a.socket.send({ type: 'task_done', msg_id: 'default-lease' });
      await boss.socket.next(update('default-lease', 'done'));
    },
    { taskTimeoutMs: 100 },
  );
});
