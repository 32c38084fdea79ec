// Logs are one JSON object per line, and never hold the authkey, identity keys or payloads.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createLogger } from '../lib/logger';
import { authBoss, authEmployee, connect, startTestRelay, TEST_AUTHKEY } from './support';

test('log lines are JSON and never carry secrets or payloads', async () => {
  const lines: string[] = [];
  const logger = createLogger('debug', (line) => lines.push(line));
  const env = await startTestRelay({ logger });
  const keys: string[] = [];
  try {
    const boss = await authBoss(env.relay);
    const worker = await authEmployee(env.relay, 'W', ['t']);
    keys.push(boss.key, worker.key);
    boss.socket.send({ type: 'message', to: worker.id, payload: { secret: 'PAYLOAD-MARKER-42' } });
    await worker.socket.next('message');
    await boss.socket.next('delivery_ack');
    const intruder = await connect(env.relay);
    intruder.send({ type: 'auth', role: 'boss', authkey: 'GUESSED-KEY-MARKER' });
    await intruder.closed;
    await Promise.all([boss.socket.close(), worker.socket.close()]);
  } finally {
    await env.dispose();
  }
  const text = lines.join('');
  const events = lines.map((line) => JSON.parse(line) as { event: string; level: string });
  for (const expected of ['relay_listening', 'auth_ok', 'message', 'auth_fail', 'disconnect', 'relay_closed']) {
    assert.ok(events.some((e) => e.event === expected), `logs ${expected}`);
  }
  assert.equal(keys.length, 2);
  for (const secret of [TEST_AUTHKEY, 'PAYLOAD-MARKER-42', 'GUESSED-KEY-MARKER', ...keys]) assert.ok(!text.includes(secret), secret);
  assert.ok(lines.every((line) => line.endsWith('\n') && !line.slice(0, -1).includes('\n')));
});
