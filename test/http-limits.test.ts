// The admin API's body limit (64 KiB): a client sending more gets a 413 with a JSON error and
// the connection closed, whether it declares the size (Content-Length, with or without
// Expect: 100-continue as curl sends it) or streams a chunked body past the limit.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { authEmployee, http, startTestRelay, TEST_AUTHKEY, type Authed, type TestRelay } from './support';

const LIMIT = 64 * 1024;

interface RawResponse {
  /** Every byte the relay sent, as text. */
  text: string;
  /** The relay closed the connection (FIN or reset) after it. */
  closed: boolean;
}

/** A raw HTTP/1.1 exchange: `write` drives the request, the promise ends when the relay closes. */
function rawExchange(port: number, write: (socket: net.Socket, received: () => string) => void): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let text = '';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the relay did not close the connection; received so far: ${JSON.stringify(text.slice(0, 300))}`));
    }, 10_000);
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => (text += chunk));
    // A write after the relay closed its side may fail with EPIPE/ECONNRESET: what was read counts.
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ text, closed: true });
    });
    socket.on('connect', () => write(socket, () => text));
  });
}

/** The first response in `text`: status, lower-cased headers, body. */
function firstResponse(text: string): { status: number; headers: Map<string, string>; body: string } {
  const end = text.indexOf('\r\n\r\n');
  assert.ok(end > 0, `an HTTP response arrived; got ${JSON.stringify(text.slice(0, 200))}`);
  const [statusLine, ...lines] = text.slice(0, end).split('\r\n');
  const headers = new Map(lines.map((line) => [line.slice(0, line.indexOf(':')).trim().toLowerCase(), line.slice(line.indexOf(':') + 1).trim()]));
  const length = Number(headers.get('content-length') ?? 0);
  return { status: Number(statusLine!.split(' ')[1]), headers, body: text.slice(end + 4, end + 4 + length) };
}

function assertBodyTooLarge(response: RawResponse): void {
  const first = firstResponse(response.text);
  assert.equal(first.status, 413, `status 413; got ${JSON.stringify(response.text.slice(0, 200))}`);
  assert.equal(first.headers.get('connection'), 'close');
  const body = JSON.parse(first.body) as Record<string, unknown>;
  assert.equal(body.code, 'body_too_large');
  assert.equal(body.error, 'body_too_large');
  assert.match(String(body.message), /65536 bytes/);
  assert.ok(response.closed);
}

describe('admin API body limit', () => {
  let env: TestRelay;
  let alice: Authed;
  let banPath: string;

  before(async () => {
    env = await startTestRelay();
    alice = await authEmployee(env.relay, 'Alice', ['x']);
    banPath = `/api/employees/${alice.id}/ban`;
  });
  after(async () => {
    await alice.socket.close();
    await env.dispose();
  });

  const head = (extra: string) =>
    `POST ${banPath} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-auth-key: ${TEST_AUTHKEY}\r\ncontent-type: application/json\r\n${extra}\r\n`;

  test('a declared Content-Length over the limit is answered 413 before the body is read, then closed', async () => {
    const body = Buffer.alloc(LIMIT + 1000, 0x20);
    const response = await rawExchange(env.relay.port, (socket) => {
      socket.write(head(`content-length: ${body.length}\r\n`));
      socket.write(body);
    });
    assertBodyTooLarge(response);
  });

  test('curl-like: with Expect: 100-continue the 413 comes instead of 100 Continue, and no body is sent', async () => {
    const answered = await rawExchange(env.relay.port, (socket) => {
      socket.write(head(`content-length: ${LIMIT + 1}\r\nexpect: 100-continue\r\n`));
    });
    assert.ok(!answered.text.startsWith('HTTP/1.1 100'), 'no 100 Continue for a body the relay refuses');
    assertBodyTooLarge(answered);
  });

  test('a chunked body that grows past the limit is answered 413 with Connection: close', async () => {
    const chunk = Buffer.alloc(8 * 1024, 0x20);
    const response = await rawExchange(env.relay.port, (socket, received) => {
      socket.write(head('transfer-encoding: chunked\r\n'));
      // Keep streaming until the relay answers (bounded: 4 MiB), the way a client uploading an
      // unknown amount does.
      let sent = 0;
      const pump = () => {
        while (received() === '' && sent < 4 * 1024 * 1024 && !socket.destroyed) {
          sent += chunk.length;
          if (!socket.write(`${chunk.length.toString(16)}\r\n${chunk.toString('latin1')}\r\n`)) {
            socket.once('drain', pump);
            return;
          }
        }
      };
      pump();
    });
    assertBodyTooLarge(response);
  });

  test('fetch with a body over the limit sees the 413 and its JSON error', async () => {
    const result = await http(env.relay, 'POST', banPath, { authkey: TEST_AUTHKEY, body: JSON.stringify({ banned: true, pad: 'x'.repeat(LIMIT) }) });
    assert.equal(result.status, 413);
    assert.equal(result.body.code, 'body_too_large');
    assert.equal(typeof result.body.message, 'string');
  });

  test('a body within the limit still works, with and without Expect: 100-continue', async () => {
    const small = await http(env.relay, 'POST', banPath, { authkey: TEST_AUTHKEY, body: { banned: false } });
    assert.equal(small.status, 200);
    const body = JSON.stringify({ banned: false });
    const response = await rawExchange(env.relay.port, (socket, received) => {
      socket.write(head(`content-length: ${body.length}\r\nexpect: 100-continue\r\nconnection: close\r\n`));
      const waitForContinue = () => {
        if (received().startsWith('HTTP/1.1 100')) socket.write(body);
        else socket.once('data', waitForContinue);
      };
      waitForContinue();
    });
    assert.ok(response.text.startsWith('HTTP/1.1 100'), 'the relay asks for the body');
    const final = firstResponse(response.text.slice(response.text.indexOf('\r\n\r\n') + 4));
    assert.equal(final.status, 200);
    assert.equal((JSON.parse(final.body) as { banned: boolean }).banned, false);
  });
});
