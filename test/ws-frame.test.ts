// The relay writes its WebSocket text frames itself (lib/ws-frame.ts). Each length form of the
// header is decoded by ws's own receiver, and forwarded messages with multi-byte payloads of
// every form reach real ws clients intact.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Writable } from 'node:stream';
import WebSocket from 'ws';
import { encodeSplitFrame, encodeTextFrame, splitText } from '../lib/ws-frame';
import { authBoss, authEmployee, startTestRelay } from './support';

/** ws exports its frame parser at runtime; its type definitions leave it out. */
type FrameReceiver = Writable & { on(event: 'message', listener: (data: Buffer, isBinary: boolean) => void): FrameReceiver };
const { Receiver } = WebSocket as unknown as { Receiver: new (options: { isServer: boolean; maxPayload: number }) => FrameReceiver };

/** What a client-side ws receiver makes of the bytes: the text messages it emits, or its error. */
function decode(bytes: Buffer): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const receiver = new Receiver({ isServer: false, maxPayload: 0 });
    const messages: string[] = [];
    receiver.on('message', (data: Buffer, isBinary: boolean) => {
      assert.equal(isBinary, false, 'a text frame');
      messages.push(data.toString());
    });
    receiver.on('error', reject);
    receiver.write(bytes, () => resolve(messages));
  });
}

/** A text of `bytes` UTF-8 bytes that mixes one-, two-, three- and four-byte characters. */
function textOfBytes(bytes: number): string {
  const pieces = ['a', 'é', '任', '😀'];
  let text = '';
  let size = 0;
  for (let i = 0; size < bytes; i++) {
    const piece = pieces[i % pieces.length]!;
    const pieceBytes = Buffer.byteLength(piece);
    if (size + pieceBytes > bytes) {
      text += 'a'.repeat(bytes - size);
      break;
    }
    text += piece;
    size += pieceBytes;
  }
  return text;
}

test('frames of every header length form decode to the text that went in', async () => {
  // 125 is the last one-byte length, 126..65535 take two more bytes, 65536 and up take eight.
  for (const bytes of [0, 1, 125, 126, 127, 65_535, 65_536, 300_000]) {
    const text = textOfBytes(bytes);
    assert.equal(Buffer.byteLength(text), bytes);
    const frame = encodeTextFrame(text);
    assert.equal(frame[0], 0x81, 'FIN and the text opcode, no extension bits');
    assert.deepEqual(await decode(frame), [text], `${bytes} bytes`);
  }
});

test('a split frame equals the frame of the joined text, and frames back to back decode in order', async () => {
  const split = splitText(`{"to":"${textOfBytes(90)}`, `","x":"${textOfBytes(40_000)}"}`);
  const middles = ['employee-1', 'é😀', ''];
  const frames = middles.map((middle) => encodeSplitFrame(split, middle));
  middles.forEach((middle, i) => {
    assert.deepEqual(frames[i], encodeTextFrame(split.head.toString() + middle + split.tail.toString()));
  });
  const decoded = await decode(Buffer.concat(frames));
  assert.deepEqual(decoded, middles.map((middle) => split.head.toString() + middle + split.tail.toString()));
});

test('multi-byte payloads of every frame length form reach each employee of a broadcast intact', async () => {
  const env = await startTestRelay();
  try {
    const boss = await authBoss(env.relay);
    const workers = [await authEmployee(env.relay, 'Frame A', ['frames']), await authEmployee(env.relay, 'Frame B', ['frames'])];
    for (const bytes of [10, 200, 70_000, 300_000]) {
      const payload = { note: textOfBytes(bytes), bytes };
      boss.socket.send({ type: 'message', to: '*', payload, msg_id: `frame-${bytes}` });
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual([...(ack.delivered as string[])].sort(), workers.map((w) => w.id).sort());
      for (const worker of workers) {
        const got = await worker.socket.next('message');
        assert.deepEqual([got.msg_id, got.to, got.payload], [`frame-${bytes}`, worker.id, payload]);
      }
    }
    await Promise.all([boss.socket.close(), ...workers.map((w) => w.socket.close())]);
  } finally {
    await env.dispose();
  }
});
