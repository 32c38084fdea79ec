// `mimiclaw-ws connect` and `mimiclaw-ws send`: RelayClient from the shell. connect prints every
// inbound frame as a JSON line on stdout and sends every JSON line of stdin; send delivers one
// message and exits with what happened to it. Exit codes: 0 ok, 1 failed, 2 bad arguments.

import fs from 'node:fs';
import readline from 'node:readline';
import type minimist from 'minimist';
import { RelayClient, RelayClientError, type RelayClientOptions, type SendOptions } from '../client';
import { ArgsError, parseKnownFlags } from './cli-flags';
import { parseDuration } from './options';
import { checkCapacity, checkPriority, isPlainObject, type DeliveryAckFrame, type EmployeeStatus, type Role, type Target } from './protocol';

export const CONNECT_USAGE =
  'usage: mimiclaw-ws connect <ws-url> (--role employee --name N --tags a,b [--capacity N] | --role boss --authkey K) [--identity-file F] [--keep-open]';
export const SEND_USAGE =
  "usage: mimiclaw-ws send <ws-url> --authkey K --to ID|tag:NAME|any:NAME|* --payload JSON [--queue] [--ttl 1h] [--priority high|normal|low] [--wait-reply] [--task-timeout 10m] [--msg-id ID] [--identity-file F] [--timeout 10s]";

const CONNECT_HELP = `${CONNECT_USAGE}

Connects as a boss or an employee and stays connected, reconnecting by itself.
Every frame from the relay is printed on stdout as one JSON line (heartbeat pongs excepted).
Every JSON line on stdin is sent as a message: {"to":"employee-…"|"tag:x"|"any:x"|"*","payload":…,
"msg_id":"optional","queue":true,"ttl_ms":60000,"priority":"high","in_reply_to":"<task msg_id>"}.
An employee ends a task with {"type":"task_done","msg_id":"…","failed":false} (or by a message
with "in_reply_to") and declares itself with {"type":"status","status":"idle"|"working"|"dnd",
"capacity":2}. A bad line gets a JSON error line on stderr
and the rest go on; status changes and errors are JSON lines on stderr too.
A boss ends at end of input: it waits for the acks of what it sent, then exits 0; sends still
without an ack after --drain-timeout are reported on stderr and it exits 1. An employee stays
connected after end of input (or with no input at all, as a service) until SIGINT/SIGTERM.
SIGINT/SIGTERM exit 0 at once.
Exit 1 when the relay refuses the auth for good (wrong authkey, banned, unknown identity…),
2 on bad arguments.

  --role boss|employee    who to connect as (required)
  --authkey K             the relay's authkey (a boss needs it; else env MIMICLAW_AUTHKEY)
  --name N, --tags a,b    an employee's registration (not needed with a saved identity)
  --employee-key K        registration key of a relay started with --employee-key
  --identity-file F       keep the identity in F (JSON, mode 0600) and reuse it next time
  --ca FILE               for wss://: trust the PEM certificate(s) in FILE (e.g. self-signed)
                          instead of the system's CAs (env NODE_EXTRA_CA_CERTS adds to them)
  --capacity N            an employee's tasks at once for any:<tag> dispatch (default 1)
  --keep-open             a boss too stays connected after end of input, until SIGINT/SIGTERM
  --drain-timeout 10s     longest wait for acks at end of input
`;

const SEND_HELP = `${SEND_USAGE}

Sends one message and prints its delivery_ack as one JSON line on stdout; with --wait-reply,
prints the reply (the message whose in_reply_to is this msg_id) instead, once it comes.
Exit 0 when it reached at least one target (delivered or queued) and no target failed;
1 when a target failed, nobody was reached, or the relay could not be reached or refused the
auth within --timeout (the reason is one line on stderr); 2 on bad arguments.

  --to T                  an id, tag:NAME, any:NAME (one free employee) or * (repeat --to for several ids)
  --payload JSON          the payload, as JSON ('{"task":"x"}', '"text"', 42)
  --queue                 keep it for offline targets until they come back (--ttl caps the wait)
  --priority P            high, normal (default) or low
  --wait-reply            wait for the reply and print it; exit 1 if the task fails or --timeout passes
  --task-timeout 10m      lease of an any:NAME task before it goes to someone else
  --msg-id ID             your msg_id: sending again with the same one is not delivered twice
  --role boss|employee    default boss; an employee needs --name/--tags or --identity-file
  --authkey K             the relay's authkey (else env MIMICLAW_AUTHKEY)
  --identity-file F       send as the identity kept in F; without it each run registers an
                          ephemeral identity that the relay forgets when the run ends
  --ca FILE               for wss://: trust the PEM certificate(s) in FILE (e.g. self-signed)
  --timeout 10s           give up after this long (with --wait-reply: on the reply too)
`;

type Args = minimist.ParsedArgs;

const COMMON_STRINGS = ['role', 'authkey', 'employee-key', 'name', 'tags', 'identity-file', 'ca'];

function parseArgs(argv: string[], strings: string[], booleans: string[]): { url: string; args: Args } {
  const args = parseKnownFlags(argv, [...COMMON_STRINGS, ...strings], booleans);
  if (args.help) return { url: '', args };
  const positional = args._.map(String);
  if (positional.length !== 1) throw new ArgsError(positional.length === 0 ? 'missing <ws-url>' : `unexpected argument ${positional[1]!}`);
  const url = positional[0]!;
  if (!/^wss?:\/\/[^/\s]+/.test(url)) throw new ArgsError(`"${url}" is not a WebSocket URL; give e.g. ws://127.0.0.1:8787/ws or wss://relay.example.com/ws`);
  return { url, args };
}

function single(args: Args, name: string): string | undefined {
  const value: unknown = args[name];
  if (value === undefined) return undefined;
  if (Array.isArray(value)) throw new ArgsError(`--${name} was given more than once`);
  return String(value);
}

function duration(args: Args, name: string, fallbackMs: number): number {
  const text = single(args, name);
  if (text === undefined) return fallbackMs;
  const ms = parseDuration(text);
  if (ms === undefined || ms <= 0) throw new ArgsError(`--${name} must be a duration such as 500ms, 10s or 2m`);
  return ms;
}

/** Role, keys, registration and identity file: what both subcommands authenticate with. */
function clientOptions(url: string, args: Args, defaultRole?: Role): RelayClientOptions {
  const role = single(args, 'role') ?? defaultRole;
  if (role !== 'boss' && role !== 'employee') throw new ArgsError('--role must be boss or employee');
  const options: RelayClientOptions = { url, role };
  const authkey = single(args, 'authkey') ?? (role === 'boss' ? process.env.MIMICLAW_AUTHKEY : undefined);
  if (role === 'boss' && !authkey) throw new ArgsError('a boss needs --authkey K (or env MIMICLAW_AUTHKEY)');
  if (authkey) options.authkey = authkey;
  const employeeKey = single(args, 'employee-key');
  if (employeeKey) options.employeeKey = employeeKey;
  const name = single(args, 'name');
  if (name !== undefined) options.name = name;
  const tags = single(args, 'tags');
  if (tags !== undefined) options.tags = tags.split(',').map((t) => t.trim()).filter((t) => t !== '');
  const identityFile = single(args, 'identity-file');
  if (identityFile) options.identityFile = identityFile;
  const ca = single(args, 'ca');
  if (ca) options.ca = readCaFile(ca);
  if (role === 'employee' && !identityFile && (!options.name || !options.tags?.length)) {
    throw new ArgsError('an employee needs --name N and --tags a,b (or --identity-file F holding a saved identity)');
  }
  return options;
}

function readCaFile(file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new ArgsError(`--ca ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'}): give the PEM certificate to trust`);
  }
}

function usageFailure(command: 'connect' | 'send', error: unknown): number {
  if (!(error instanceof ArgsError)) throw error;
  process.stderr.write(`mimiclaw-ws ${command}: ${error.message}\n${command === 'connect' ? CONNECT_USAGE : SEND_USAGE}\n`);
  return 2;
}

function errorInfo(error: unknown): { code: string; message: string } {
  if (error instanceof RelayClientError) return { code: error.code, message: error.message };
  return { code: 'error', message: error instanceof Error ? error.message : String(error) };
}

// ---- send ------------------------------------------------------------------------------------

interface SendCommand {
  client: RelayClientOptions;
  to: Target;
  payload: unknown;
  send: SendOptions;
  timeoutMs: number;
  waitReply: boolean;
}

function parseSend(argv: string[]): SendCommand | 'help' {
  const { url, args } = parseArgs(argv, ['to', 'payload', 'ttl', 'msg-id', 'timeout', 'priority', 'task-timeout'], ['queue', 'wait-reply']);
  if (args.help) return 'help';
  const client = clientOptions(url, args, 'boss');
  // A one-off sender leaves nothing behind: no identity pile-up, and two runs at once do not
  // replace each other as a shared saved identity would.
  if (client.identityFile === undefined) client.ephemeral = true;
  const rawTo: unknown = args.to;
  const targets = (Array.isArray(rawTo) ? rawTo : rawTo === undefined ? [] : [rawTo]).map(String).filter((t) => t !== '');
  if (targets.length === 0) throw new ArgsError('missing --to ID|tag:NAME|*');
  const payloadText = single(args, 'payload');
  if (payloadText === undefined) throw new ArgsError('missing --payload JSON');
  let payload: unknown;
  try {
    payload = JSON.parse(payloadText);
  } catch {
    throw new ArgsError(`--payload must be JSON, e.g. '{"task":"x"}' or '"some text"' (got ${payloadText.slice(0, 40)})`);
  }
  const send: SendOptions = {};
  if (args.queue) send.queue = true;
  if (args.ttl !== undefined) send.ttlMs = duration(args, 'ttl', 0);
  const msgId = single(args, 'msg-id');
  if (msgId) send.msgId = msgId;
  const priority = single(args, 'priority');
  if (priority !== undefined) {
    const checked = checkPriority(priority);
    if (!checked.ok) throw new ArgsError('--priority must be high, normal or low');
    send.priority = checked.value;
  }
  if (args['task-timeout'] !== undefined) send.taskTimeoutMs = duration(args, 'task-timeout', 0);
  return {
    client,
    to: targets.length === 1 ? targets[0]! : targets,
    payload,
    send,
    timeoutMs: duration(args, 'timeout', 10_000),
    waitReply: Boolean(args['wait-reply']),
  };
}

/** 0 when someone got it (delivered or queued) and nobody failed; otherwise the reason. */
function ackVerdict(ack: DeliveryAckFrame): string | null {
  if (ack.failed.length > 0) return `not delivered to ${ack.failed.map((f) => `${f.id} (${f.reason})`).join(', ')}`;
  if (ack.delivered.length === 0 && (ack.queued ?? []).length === 0) return 'the message reached no one (no target online or known)';
  return null;
}

export async function runSend(argv: string[]): Promise<number> {
  let command: SendCommand | 'help';
  try {
    command = parseSend(argv);
  } catch (error) {
    return usageFailure('send', error);
  }
  if (command === 'help') {
    process.stdout.write(SEND_HELP);
    return 0;
  }
  const client = new RelayClient({ ...command.client, ackTimeoutMs: command.timeoutMs, heartbeatIntervalMs: 0 });
  let lastProblem = '';
  client.on('error', (error) => (lastProblem = error.message));
  client.connect().catch(() => undefined);
  try {
    if (command.waitReply) {
      const reply = await client.request(command.to, command.payload, { ...command.send, timeoutMs: command.timeoutMs });
      process.stdout.write(JSON.stringify(reply) + '\n');
      return 0;
    }
    const ack = await client.send(command.to, command.payload, command.send);
    process.stdout.write(JSON.stringify(ack) + '\n');
    const problem = ackVerdict(ack);
    if (problem === null) return 0;
    process.stderr.write(`mimiclaw-ws send: ${problem}\n`);
    return 1;
  } catch (error) {
    const { code, message } = errorInfo(error);
    const unreachable = code === 'ack_timeout' && client.identity === null && lastProblem !== '';
    process.stderr.write(`mimiclaw-ws send: ${code}: ${unreachable ? `could not connect within the timeout (${lastProblem})` : message}\n`);
    return 1;
  } finally {
    await client.close();
  }
}

// ---- connect ---------------------------------------------------------------------------------

interface ConnectCommand {
  client: RelayClientOptions;
  keepOpen: boolean;
  drainTimeoutMs: number;
}

function parseConnect(argv: string[]): ConnectCommand | 'help' {
  const { url, args } = parseArgs(argv, ['drain-timeout', 'capacity'], ['keep-open']);
  if (args.help) return 'help';
  const client = clientOptions(url, args);
  const capacityText = single(args, 'capacity');
  if (capacityText !== undefined) {
    const capacity = checkCapacity(/^\d+$/.test(capacityText) ? Number(capacityText) : NaN);
    if (!capacity.ok || capacity.value === undefined) throw new ArgsError('--capacity must be a whole number of tasks, 1 or more');
    client.capacity = capacity.value;
  }
  // An employee is a worker: it waits for work whether or not it has anything to say.
  const keepOpen = Boolean(args['keep-open']) || client.role === 'employee';
  return { client, keepOpen, drainTimeoutMs: duration(args, 'drain-timeout', 10_000) };
}

/** Sends a connect session keeps in hand before it stops reading stdin. */
const MAX_PENDING_SENDS = 1000;

const writeLine = (stream: NodeJS.WritableStream, value: unknown) => stream.write(JSON.stringify(value) + '\n');

type InputLine =
  | { to: Target; payload: unknown; options: SendOptions }
  | { taskDone: string; failed: boolean }
  | { status: EmployeeStatus | undefined; capacity: number | undefined };

/** One stdin line as a send (or task_done / status), or the reason it is not one. */
function parseInputLine(line: string): InputLine | string {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return 'not JSON: give one object per line, e.g. {"to":"*","payload":{"task":"x"}}';
  }
  if (!isPlainObject(value)) return 'not a JSON object: give e.g. {"to":"*","payload":{"task":"x"}}';
  if (value.type === 'task_done') {
    if (typeof value.msg_id !== 'string' || value.msg_id === '') return 'task_done needs "msg_id": the msg_id of the task';
    if (value.failed !== undefined && typeof value.failed !== 'boolean') return '"failed" must be true or false';
    return { taskDone: value.msg_id, failed: value.failed === true };
  }
  if (value.type === 'status') {
    const status = value.status;
    if (status !== undefined && status !== 'idle' && status !== 'working' && status !== 'dnd') return '"status" must be idle, working or dnd';
    const capacity = checkCapacity(value.capacity);
    if (!capacity.ok) return capacity.error.message;
    if (status === undefined && capacity.value === undefined) return 'a status line needs "status", "capacity" or both';
    return { status, capacity: capacity.value };
  }
  if (value.type !== undefined && value.type !== 'message') return 'only messages, task_done and status can be sent: leave out "type" or use "message"';
  if (value.to === undefined) return 'missing "to": an id, an array of ids, "tag:NAME" or "*"';
  const options: SendOptions = {};
  if (value.msg_id !== undefined) {
    if (typeof value.msg_id !== 'string') return '"msg_id" must be a string';
    options.msgId = value.msg_id;
  }
  if (value.queue !== undefined) {
    if (typeof value.queue !== 'boolean') return '"queue" must be true or false';
    options.queue = value.queue;
  }
  if (value.ttl_ms !== undefined) {
    if (typeof value.ttl_ms !== 'number') return '"ttl_ms" must be a number of milliseconds';
    options.ttlMs = value.ttl_ms;
  }
  if (value.priority !== undefined) {
    const priority = checkPriority(value.priority);
    if (!priority.ok) return '"priority" must be high, normal or low';
    options.priority = priority.value;
  }
  if (value.in_reply_to !== undefined) {
    if (typeof value.in_reply_to !== 'string' || value.in_reply_to === '') return '"in_reply_to" must be the msg_id of the task answered';
    options.inReplyTo = value.in_reply_to;
  }
  if (value.task_timeout_ms !== undefined) {
    if (typeof value.task_timeout_ms !== 'number') return '"task_timeout_ms" must be a number of milliseconds';
    options.taskTimeoutMs = value.task_timeout_ms;
  }
  return { to: value.to as Target, payload: value.payload, options };
}

export async function runConnect(argv: string[]): Promise<number> {
  let command: ConnectCommand | 'help';
  try {
    command = parseConnect(argv);
  } catch (error) {
    return usageFailure('connect', error);
  }
  if (command === 'help') {
    process.stdout.write(CONNECT_HELP);
    return 0;
  }
  const client = new RelayClient({ ...command.client, maxPendingSends: MAX_PENDING_SENDS });
  let stopping = false;
  let finish: (code: number) => void = () => undefined;
  const finished = new Promise<number>((resolve) => (finish = resolve));
  client.on('frame', (frame) => frame.type !== 'pong' && writeLine(process.stdout, frame));
  client.on('status', (change) => {
    writeLine(process.stderr, { event: 'status', ...change });
    if (change.status === 'closed' && !stopping) finish(1);
  });
  client.on('error', (error) => error instanceof Error && writeLine(process.stderr, { event: 'error', error: errorInfo(error) }));
  const onSignal = () => finish(0);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  client.connect().catch(() => undefined);

  const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  const inFlight = new Set<Promise<unknown>>();
  void pumpInput(client, input, inFlight).then(async () => {
    if (command.keepOpen) return;
    await settleWithin([...inFlight], command.drainTimeoutMs);
    // Sends still without an ack are rejected (and reported) as the client closes.
    finish(inFlight.size > 0 ? 1 : 0);
  });

  const code = await finished;
  stopping = true;
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  input.close();
  process.stdin.destroy();
  await client.close();
  await Promise.allSettled([...inFlight]);
  return code;
}

async function pumpInput(client: RelayClient, input: readline.Interface, inFlight: Set<Promise<unknown>>): Promise<void> {
  let lineNo = 0;
  for await (const raw of input) {
    lineNo++;
    const line = raw.trim();
    if (line === '') continue;
    const parsed = parseInputLine(line);
    if (typeof parsed === 'string') {
      writeLine(process.stderr, { event: 'error', line: lineNo, error: { code: 'invalid_input', message: parsed } });
      continue;
    }
    if ('taskDone' in parsed) {
      if (!client.done({ msg_id: parsed.taskDone }, { failed: parsed.failed })) {
        writeLine(process.stderr, { event: 'error', line: lineNo, error: { code: 'closed', message: 'not connected: the task went back to the relay with the connection' } });
      }
      continue;
    }
    if ('status' in parsed) {
      const at = lineNo;
      const change = { ...(parsed.status !== undefined && { status: parsed.status }), ...(parsed.capacity !== undefined && { capacity: parsed.capacity }) };
      const declared: Promise<unknown> = client
        .setAvailability(change)
        .catch((error: unknown) => writeLine(process.stderr, { event: 'error', line: at, error: errorInfo(error) }))
        .finally(() => inFlight.delete(declared));
      inFlight.add(declared);
      continue;
    }
    // Backpressure: read no further while the client holds as many sends as it may.
    while (client.pendingCount >= MAX_PENDING_SENDS && inFlight.size > 0) await Promise.race(inFlight);
    const at = lineNo;
    const sent: Promise<unknown> = client
      .send(parsed.to, parsed.payload, parsed.options)
      .catch((error: unknown) => writeLine(process.stderr, { event: 'error', line: at, error: errorInfo(error) }))
      .finally(() => inFlight.delete(sent));
    inFlight.add(sent);
  }
}

async function settleWithin(promises: Promise<unknown>[], timeoutMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([Promise.allSettled(promises), new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
  clearTimeout(timer);
}
