// Frames nested deeper than MAX_FRAME_DEPTH are refused with invalid_json before they are
// parsed; the connection stays usable and brackets inside strings do not count.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { MAX_FRAME_DEPTH } from '../lib/protocol';
import { authBoss, authEmployee, connect, startTestRelay, TEST_AUTHKEY, type Authed, type Frame, type TestRelay } from './support';

/** `levels` arrays, one inside the other, around 0: nesting `levels` deep. */
function nested(levels: number): string {
  return '['.repeat(levels) + '0' + ']'.repeat(levels);
}

/** A message frame whose payload makes the whole frame `depth` levels deep (the frame object is level 1). */
function messageOfDepth(to: string, depth: number, msgId: string): string {
  return `{"type":"message","to":${JSON.stringify(to)},"msg_id":${JSON.stringify(msgId)},"payload":${nested(depth - 1)}}`;
}

/** Matches the frame of `type` about message `msgId`. */
function answering(type: string, msgId: string): (f: Frame) => boolean {
  return (f) => f.type === type && f.msg_id === msgId;
}

describe('frame nesting bound', () => {
  let env: TestRelay;
  let boss: Authed;
  let employee: Authed;
  before(async () => {
    env = await startTestRelay();
    boss = await authBoss(env.relay);
    employee = await authEmployee(env.relay, 'Deep', ['deep']);
  });
  after(async () => {
    await Promise.all([boss.socket.close(), employee.socket.close()]);
    await env.dispose();
  });

  test('a frame one level past the bound gets invalid_json saying so; the connection stays usable', async () => {
    boss.socket.send(messageOfDepth(employee.id, MAX_FRAME_DEPTH + 1, 'too-deep'));
    const error = await boss.socket.next('error');
    assert.equal(error.code, 'invalid_json');
    assert.match(String(error.message), new RegExp(`more than ${MAX_FRAME_DEPTH} levels`));

    boss.socket.send('['.repeat(59_000));
    const unclosed = await boss.socket.next('error');
    assert.equal(unclosed.code, 'invalid_json');
    assert.match(String(unclosed.message), /levels/);

    boss.socket.send({ type: 'ping' });
    await boss.socket.next('pong');
    employee.socket.send({ type: 'ping' });
    await employee.socket.next('pong');
    assert.equal(employee.socket.frames.filter((f) => f.type === 'message').length, 0, 'the refused frames were not routed');
  });

  test('a frame exactly at the bound is routed', async () => {
    boss.socket.send(messageOfDepth(employee.id, MAX_FRAME_DEPTH, 'at-bound'));
    const ack = await boss.socket.next(answering('delivery_ack', 'at-bound'));
    assert.deepEqual(ack.delivered, [employee.id]);
    const got = await employee.socket.next(answering('message', 'at-bound'));
    assert.equal(JSON.stringify(got.payload), nested(MAX_FRAME_DEPTH - 1));
  });

  test('brackets inside strings and escaped quotes do not count as nesting', async () => {
    const text = '"[[{' + '['.repeat(5000) + '\\' + '{'.repeat(300) + '\\\\';
    boss.socket.send({ type: 'message', to: employee.id, msg_id: 'in-strings', payload: { text, more: ['"[', '\\', text] } });
    assert.deepEqual((await boss.socket.next(answering('delivery_ack', 'in-strings'))).delivered, [employee.id]);
    const got = await employee.socket.next(answering('message', 'in-strings'));
    assert.deepEqual(got.payload, { text, more: ['"[', '\\', text] });
  });

  test('before auth a deep frame gets invalid_json and the socket may still authenticate', async () => {
    const socket = await connect(env.relay);
    socket.send(nested(MAX_FRAME_DEPTH + 1));
    assert.equal((await socket.next('error')).code, 'invalid_json');
    socket.send({ type: 'auth', role: 'boss', authkey: TEST_AUTHKEY });
    await socket.next('auth_ok');
    await socket.close();
  });

  test('hundreds of deep frames are each answered while another client keeps being served', async () => {
    const flood = '['.repeat(60_000);
    for (let i = 0; i < 300; i++) boss.socket.send(flood);
    employee.socket.send({ type: 'ping' });
    await employee.socket.next('pong');
    for (let i = 0; i < 300; i++) assert.equal((await boss.socket.next('error')).code, 'invalid_json');
    boss.socket.send({ type: 'ping' });
    await boss.socket.next('pong');
  });
});
