// Fault tests, hostile clients: 100,000 bad frames from several sockets and a client flooding
// past the rate limit. The relay runs as a child process so its memory is measured on its own;
// a well-behaved boss/employee pair keeps routing throughout.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import { test } from 'node:test';
import WebSocket from 'ws';
import { CHILD_AUTHKEY, rssBytes, startRelayProcess, wellBehavedPair, type RelayProcess } from './fault-support';
import { http, makeTempDir, type Frame } from './support';

/** What a frame's answer is, as "error:<code>" or the frame type. */
function answerKey(frame: Frame): string {
  return frame.type === 'error' ? `error:${String(frame.code)}` : frame.type;
}

type Outgoing = [data: string | Buffer, expected: string];

/**
 * A socket that sends frames with the answer each must get, checks the answers in order, and
 * keeps at most `window` frames unanswered; it holds counts, not frames.
 */
class HostileSocket {
  readonly ws: WebSocket;
  readonly closed: Promise<number>;
  readonly mismatches: string[] = [];
  readonly answers = new Map<string, number>();
  sent = 0;
  answered = 0;
  private readonly expected: string[] = [];
  private handshake: Frame[] = [];
  private counting = false;
  private wake: (() => void) | null = null;

  constructor(url: string) {
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.ws.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      this.ws.on('close', (code) => {
        resolve(code);
        this.wake?.();
      }),
    );
    this.ws.on('message', (data) => this.onFrame(JSON.parse(String(data)) as Frame));
  }

  /** Waits for hello and, unless `auth` is null, authenticates with it. */
  async start(auth: Record<string, unknown> | null): Promise<Frame | null> {
    await this.handshakeFrame('hello');
    if (auth === null) {
      this.counting = true;
      return null;
    }
    this.ws.send(JSON.stringify(auth));
    const ok = await this.handshakeFrame('auth_ok');
    this.counting = true;
    return ok;
  }

  private async handshakeFrame(type: string): Promise<Frame> {
    // A bound against a hang, not a timing target: a loaded machine may take seconds to greet.
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      const frame = this.handshake.shift();
      if (frame) {
        assert.equal(frame.type, type);
        return frame;
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 50);
      });
    }
    throw new Error(`no ${type} frame within 60 s`);
  }

  private onFrame(frame: Frame): void {
    if (!this.counting) {
      this.handshake.push(frame);
      this.wake?.();
      return;
    }
    const expected = this.expected.shift();
    const got = answerKey(frame);
    this.answered++;
    this.answers.set(got, (this.answers.get(got) ?? 0) + 1);
    if (got !== expected && this.mismatches.length < 10) this.mismatches.push(`answer ${this.answered}: expected ${String(expected)}, got ${got}`);
    if (this.wake && this.sent - this.answered <= 64) {
      const wake = this.wake;
      this.wake = null;
      wake();
    }
  }

  send([data, expected]: Outgoing): void {
    // A Buffer is sent as a binary frame unless it is marked as (invalid) text.
    this.ws.send(data, { binary: Buffer.isBuffer(data) });
    this.expected.push(expected);
    this.sent++;
  }

  get isOpen(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  /** Resolves once at most 64 frames are unanswered (or the socket closed). */
  private room(): Promise<void> {
    if (this.sent - this.answered <= 64 || !this.isOpen) return Promise.resolve();
    return new Promise((resolve) => (this.wake = resolve));
  }

  /** Sends `count` frames made by `make`, at most `window` unanswered; resolves when all are answered. */
  async flood(count: number, make: (k: number) => Outgoing, window = 256): Promise<void> {
    for (let k = 0; k < count; k++) {
      if (this.sent - this.answered >= window) await this.room();
      assert.ok(this.isOpen, `socket closed after ${this.answered} answers: ${this.mismatches.join('; ')}`);
      this.send(make(k));
    }
    await this.settle();
  }

  /** Resolves once every frame sent is answered (or the socket closed). */
  async settle(): Promise<void> {
    while (this.answered < this.sent && this.isOpen) {
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 100);
      });
    }
  }
}

const LIMIT = 64 * 1024;

/** Bad frames after auth, each with the answer the relay owes it. */
function authenticatedCatalogue(): { small: Outgoing[]; large: Outgoing[] } {
  const nearLimitText = (prefix: string, suffix: string) => prefix + 'x'.repeat(LIMIT - prefix.length - suffix.length - 16) + suffix;
  const manyTargets = JSON.stringify({ type: 'message', to: Array.from({ length: 8000 }, (_, i) => `e${i.toString(36)}`), payload: 1 });
  assert.ok(manyTargets.length < LIMIT);
  return {
    small: [
      ['{"type":"message",', 'error:invalid_json'],
      ['[1,2,3]', 'error:invalid_json'],
      ['"just a string"', 'error:invalid_json'],
      ['null', 'error:invalid_json'],
      ['{"type":42}', 'error:invalid_json'],
      ['{"type":"launch_missiles"}', 'error:unsupported_type'],
      ['{"type":"message","to":42,"payload":1}', 'error:invalid_to'],
      ['{"type":"message","to":[],"payload":1}', 'error:invalid_to'],
      ['{"type":"message","to":"*","msg_id":{"a":1}}', 'error:invalid_msg_id'],
      ['{"type":"message","to":"employee-nobody","queue":"yes"}', 'error:invalid_frame'],
      ['{"type":"message","to":"employee-nobody","queue":true,"ttl_ms":-1}', 'error:invalid_frame'],
      ['{"type":"health_report","valid":"yes"}', 'error:invalid_health_report'],
      ['{"type":"auth","role":"boss","authkey":"guess"}', 'error:unsupported_type'],
      [Buffer.from([0xff, 0x00, 0x81, 0x7b]), 'error:invalid_json'],
      ['{"type":"message","to":"employee-nobody","payload":"x"}', 'delivery_ack'],
    ],
    large: [
      ['['.repeat(100_000), 'error:payload_too_large'],
      ['['.repeat(60_000), 'error:invalid_json'],
      [`{"type":"message","to":"employee-nobody","payload":${'['.repeat(30_000)}${']'.repeat(30_000)}}`, 'error:invalid_json'],
      [nearLimitText('{"type":"no_such_type","s":"', '"}'), 'error:unsupported_type'],
      [nearLimitText('{"type":"message","to":"employee-nobody","payload":"', ''), 'error:invalid_json'],
      [JSON.stringify({ type: 'message', to: 'employee-nobody', payload: 'x'.repeat(LIMIT + 100) }), 'error:payload_too_large'],
      [manyTargets, 'error:too_many_targets'],
    ],
  };
}

/** Bad frames before auth. */
function unauthenticatedCatalogue(): { small: Outgoing[]; large: Outgoing[] } {
  return {
    small: [
      ['{"type":"message","to":"*","payload":1}', 'error:auth_required'],
      ['{"type":"ping"}', 'error:auth_required'],
      ['not json at all', 'error:invalid_json'],
      ['{"type":7}', 'error:invalid_json'],
      [Buffer.from('{"type":"auth"}'), 'error:invalid_json'],
    ],
    large: [
      ['['.repeat(100_000), 'error:payload_too_large'],
      ['{"type":"hello","s":"' + 'y'.repeat(LIMIT - 64) + '"}', 'error:auth_required'],
    ],
  };
}

/** Every 50th frame is a large one. */
function picker(catalogue: { small: Outgoing[]; large: Outgoing[] }): (k: number) => Outgoing {
  return (k) =>
    k % 50 === 49 ? catalogue.large[Math.floor(k / 50) % catalogue.large.length]! : catalogue.small[k % catalogue.small.length]!;
}

const BAD_AUTHS: [Record<string, unknown>, string][] = [
  [{ type: 'auth', role: 'boss', authkey: 'wrong' }, 'invalid_authkey'],
  [{ type: 'auth', role: 'admin' }, 'invalid_role'],
  [{ type: 'auth', role: 'employee', name: '  ', tags: ['x'] }, 'invalid_name'],
  [{ type: 'auth', role: 'employee', name: 'n', tags: 'x' }, 'invalid_tags'],
  [{ type: 'auth', role: 'employee', identity: { id: 'employee-none', key: 'k' } }, 'identity_not_found'],
];

/** One bad auth per socket: the error, then close 4003. Returns the code each was owed and the answer it got. */
async function authFlood(url: string, attempts: number, concurrency: number): Promise<{ owed: string; answer: string }[]> {
  const codes: { owed: string; answer: string }[] = [];
  let next = 0;
  const worker = async () => {
    while (next < attempts) {
      const [auth, code] = BAD_AUTHS[next++ % BAD_AUTHS.length]!;
      const socket = new HostileSocket(url);
      await socket.start(null);
      socket.send([JSON.stringify(auth), `error:${code}`]);
      assert.equal(await socket.closed, 4003, 'a rejected auth is closed with 4003');
      const [answer] = [...socket.answers.keys()];
      assert.equal(socket.answered, 1);
      assert.ok(answer === `error:${code}` || answer === 'error:auth_throttled', `bad auth answered ${String(answer)}`);
      codes.push({ owed: `error:${code}`, answer: answer! });
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return codes;
}

/** Sockets sent one frame the relay must close them for, with the close code. */
async function closingFrames(url: string, count: number, data: Buffer | string, text: boolean): Promise<number[]> {
  return Promise.all(
    Array.from({ length: count }, async () => {
      const socket = new HostileSocket(url);
      await socket.start(null);
      socket.ws.send(data, { binary: !text });
      return socket.closed;
    }),
  );
}

async function stopRelay(relay: RelayProcess | undefined, dir: string): Promise<void> {
  if (relay) await relay.child.stop('SIGTERM').catch(() => relay.child.stop('SIGKILL'));
  await fs.rm(dir, { recursive: true, force: true });
}

/** Four authenticated sockets (two bosses, two employees) and two that never authenticate. */
async function openHostileSockets(url: string): Promise<{ authed: HostileSocket[]; anonymous: HostileSocket[] }> {
  const open = async (auth: Record<string, unknown> | null) => {
    const socket = new HostileSocket(url);
    await socket.start(auth);
    return socket;
  };
  const boss = { type: 'auth', role: 'boss', authkey: CHILD_AUTHKEY };
  const employee = (n: number) => ({ type: 'auth', role: 'employee', name: `Hostile-${n}`, tags: ['hostile'] });
  return {
    authed: await Promise.all([open(boss), open(employee(1)), open(boss), open(employee(3))]),
    anonymous: await Promise.all([open(null), open(null)]),
  };
}

const FLOOD = { perAuthed: 22_000, perAnonymous: 5_737, authAttempts: 500, tooLarge: 20, badUtf8: 6 };

/** Runs every kind of hostile traffic at once; resolves with what the one-shot sockets got. */
async function hostileFlood(url: string, authed: HostileSocket[], anonymous: HostileSocket[]) {
  const authCodes = authFlood(url, FLOOD.authAttempts, 10);
  const tooLargeCloses = closingFrames(url, FLOOD.tooLarge, 'z'.repeat(3 * LIMIT), true);
  const badUtf8Closes = closingFrames(url, FLOOD.badUtf8, Buffer.from([0x7b, 0xc3, 0x28, 0x7d]), true);
  await Promise.all([
    ...authed.map((socket) => socket.flood(FLOOD.perAuthed, picker(authenticatedCatalogue()))),
    ...anonymous.map((socket) => socket.flood(FLOOD.perAnonymous, picker(unauthenticatedCatalogue()))),
    authCodes,
    tooLargeCloses,
    badUtf8Closes,
  ]);
  return { authCodes: await authCodes, tooLargeCloses: await tooLargeCloses, badUtf8Closes: await badUtf8Closes };
}

test('100,000 hostile frames from several sockets: each gets its answer, the relay stays up and bounded, a pair keeps routing', async () => {
  const dir = await makeTempDir();
  let relay: RelayProcess | undefined;
  try {
    relay = await startRelayProcess(dir, ['--max-payload', '64KiB', '--auth-timeout', '2m', '--throttle-loopback']);
    const pair = await wellBehavedPair(relay, CHILD_AUTHKEY);
    await pair.roundTrip();
    const { authed, anonymous } = await openHostileSockets(relay.url);
    const rssBefore = await rssBytes(relay.pid);
    const { perAuthed, perAnonymous, authAttempts, tooLarge, badUtf8 } = FLOOD;
    assert.equal(4 * perAuthed + 2 * perAnonymous + authAttempts + tooLarge + badUtf8, 100_000);

    let flooding = true;
    const flood = hostileFlood(relay.url, authed, anonymous).finally(() => (flooding = false));
    // Round trips while the flood is in flight; the first starts with every flood socket's
    // first window of frames already sent.
    let tripsDuringFlood = 0;
    while (flooding) {
      await pair.roundTrip();
      if (flooding) tripsDuringFlood++;
    }
    const { authCodes, tooLargeCloses, badUtf8Closes } = await flood;

    for (const socket of [...authed, ...anonymous]) {
      assert.deepEqual(socket.mismatches, [], 'every hostile frame gets the answer it is owed');
      assert.equal(socket.answered, socket.sent);
      assert.ok(socket.isOpen, 'bad frames under twice the limit keep the connection');
    }
    assert.equal([...authed, ...anonymous].reduce((sum, s) => sum + s.sent, 0), 4 * perAuthed + 2 * perAnonymous);
    // Only wrong secrets count: of the wrong authkeys (one bad auth in five), the first 20 get
    // invalid_authkey (--max-auth-failures default) and the rest auth_throttled; every
    // other bad auth gets its own code however many came before it.
    const wrongKeys = authCodes.filter(({ owed }) => owed === 'error:invalid_authkey');
    assert.equal(wrongKeys.length, authAttempts / BAD_AUTHS.length);
    assert.equal(wrongKeys.filter(({ answer }) => answer === 'error:invalid_authkey').length, 20, 'the first 20 wrong authkeys get their own code');
    assert.equal(wrongKeys.filter(({ answer }) => answer === 'error:auth_throttled').length, wrongKeys.length - 20, 'further authkey guesses are throttled');
    const others = authCodes.filter(({ owed }) => owed !== 'error:invalid_authkey');
    assert.deepEqual(others.filter(({ owed, answer }) => owed !== answer), [], 'invalid auths are never throttled');
    const throttleLines = relay.logLines().filter((line) => line.event === 'auth_throttled');
    assert.equal(throttleLines.length, 1, 'reaching the limit is logged once');
    assert.equal(throttleLines[0]!.guessed, 'the authkey');
    assert.ok(!JSON.stringify(throttleLines[0]).includes('"wrong"'), 'the guessed secret is not logged');
    assert.deepEqual(tooLargeCloses, Array(tooLarge).fill(1009), 'frames over twice the limit are closed with 1009');
    assert.deepEqual(badUtf8Closes, Array(badUtf8).fill(1007), 'text frames that are not UTF-8 are closed with 1007');
    assert.ok(tripsDuringFlood >= 1, 'the pair routed while the flood was in flight');

    assert.equal(relay.child.child.exitCode, null, 'the relay is still running');
    assert.equal((await http(relay, 'GET', '/health')).status, 200);
    for (let n = 0; n < 5; n++) await pair.roundTrip();
    for (const socket of authed) {
      socket.send(['{"type":"ping"}', 'pong']);
      await socket.settle();
      assert.deepEqual(socket.mismatches, [], 'the hostile connections are still usable');
    }
    const growth = (await rssBytes(relay.pid)) - rssBefore;
    assert.ok(growth < 200 * 1024 * 1024, `relay RSS grew by ${Math.round(growth / 1048576)} MB during the flood (bound 200 MB)`);
    await pair.close();
    for (const socket of [...authed, ...anonymous]) socket.ws.close();
  } finally {
    await stopRelay(relay, dir);
  }
});

test('a client flooding past --rate-limit 100 gets rate_limited with retry_after_ms while a pair keeps routing', async () => {
  const dir = await makeTempDir();
  let relay: RelayProcess | undefined;
  try {
    const rate = 100;
    relay = await startRelayProcess(dir, ['--rate-limit', String(rate)]);
    const pair = await wellBehavedPair(relay, CHILD_AUTHKEY);
    const flooder = new HostileSocket(relay.url);
    await flooder.start({ type: 'auth', role: 'boss', authkey: CHILD_AUTHKEY });
    const retryAfter: number[] = [];
    flooder.ws.on('message', (data) => {
      const frame = JSON.parse(String(data)) as Frame;
      if (frame.code === 'rate_limited') retryAfter.push(frame.retry_after_ms as number);
    });

    const frames = 3000;
    const ping: Outgoing = ['{"type":"ping"}', 'pong'];
    const message: Outgoing = ['{"type":"message","to":"employee-nobody","payload":1}', 'delivery_ack'];
    const started = Date.now();
    let flooding = true;
    const flood = flooder.flood(frames, (k) => (k % 2 === 0 ? ping : message), 500).finally(() => (flooding = false));
    while (flooding) await pair.roundTrip();
    await flood;
    const elapsedMs = Date.now() - started;

    assert.equal(flooder.answered, frames, 'every frame is answered');
    const limited = flooder.answers.get('error:rate_limited') ?? 0;
    const served = (flooder.answers.get('pong') ?? 0) + (flooder.answers.get('delivery_ack') ?? 0);
    assert.equal(served + limited, frames, `answers: ${JSON.stringify([...flooder.answers])}`);
    assert.ok(limited > 0, 'the flood is rate limited');
    // The bucket holds one second's worth and refills at `rate` per second.
    const allowed = rate + Math.ceil((rate * elapsedMs) / 1000) + 1;
    assert.ok(served <= allowed, `${served} frames were served in ${elapsedMs} ms; the bucket allows at most ${allowed}`);
    assert.equal(retryAfter.length, limited);
    assert.ok(retryAfter.every((ms) => Number.isInteger(ms) && ms > 0 && ms <= 1000 / rate), 'retry_after_ms says when one token is back');

    // Once it slows down, the flooder is served again on the same connection.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const before = flooder.answers.get('pong') ?? 0;
    await flooder.flood(5, () => ping);
    assert.equal(flooder.answers.get('pong'), before + 5);
    assert.ok(flooder.isOpen);
    assert.ok(pair.trips >= 1);
    for (let n = 0; n < 3; n++) await pair.roundTrip();
    await pair.close();
    flooder.ws.close();
  } finally {
    await stopRelay(relay, dir);
  }
});
