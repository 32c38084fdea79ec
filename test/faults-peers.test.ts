// Fault tests, dead and slow peers: an employee that stops reading must not grow the relay's
// memory and is disconnected once stuck past the time bound; a peer silent for two ping
// intervals is terminated, shown offline and its disconnect logged.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import type WebSocket from 'ws';
import { createLogger } from '../lib/logger';
import { CHILD_AUTHKEY, eventually, rssBytes, sleep, startRelayProcess, wellBehavedPair, type RelayProcess } from './fault-support';
import { authBoss, authEmployee, http, makeTempDir, reconnect, startTestRelay, type Frame, type RelayEndpoint } from './support';

/** Stops reading from the socket: the peer's kernel buffers fill and the relay's send buffer grows. */
function stopReading(ws: WebSocket): void {
  (ws as unknown as { _socket: net.Socket })._socket.pause();
}

async function isOnline(relay: RelayEndpoint, id: string): Promise<boolean> {
  const { body } = await http(relay, 'GET', '/api/employees');
  const employee = (body.employees as { id: string; online: boolean }[]).find((e) => e.id === id);
  assert.ok(employee, `${id} is listed in /api/employees`);
  return employee.online;
}

const KIB = 1024;

/** Largest TCP receive plus send buffer the kernel may give one loopback connection. */
async function kernelBufferMax(): Promise<number> {
  const max = async (name: string) => Number((await fs.readFile(`/proc/sys/net/ipv4/${name}`, 'utf8')).trim().split(/\s+/)[2]);
  return (await max('tcp_rmem')) + (await max('tcp_wmem'));
}

test('an employee that never reads: target_slow past the buffer bound, queued with queue:true, bounded memory, other pairs routing, then disconnected', async () => {
  const dir = await makeTempDir();
  let relay: RelayProcess | undefined;
  let pinger: NodeJS.Timeout | undefined;
  try {
    relay = await startRelayProcess(dir, ['--max-buffered', '64KiB', '--ping-interval', '500ms', '--slow-peer-timeout', '5s', '--log-level', 'info']);
    const pair = await wellBehavedPair(relay, CHILD_AUTHKEY);
    const boss = await authBoss(relay, CHILD_AUTHKEY);
    const stuck = await authEmployee(relay, 'Stuck', ['slow']);
    stopReading(stuck.socket.ws);
    // It still writes, so the relay sees it alive: what ends it must be the slow-peer bound.
    pinger = setInterval(() => stuck.socket.send({ type: 'ping' }), 100);
    const rssBefore = await rssBytes(relay.pid);

    const payload = 'p'.repeat(4 * KIB);
    const cap = 30_000;
    let deliveredBytes = 0;
    let firstSlow: Frame | undefined;
    for (let i = 0; i < cap && !firstSlow; i++) {
      boss.socket.send({ type: 'message', to: stuck.id, payload, msg_id: `fill-${i}` });
      const ack = await boss.socket.next('delivery_ack');
      if ((ack.delivered as string[]).length === 1) deliveredBytes += payload.length;
      else firstSlow = ack;
    }
    assert.ok(firstSlow, `all ${cap} messages (${(cap * 4) / 1024} MiB) were written to a peer that reads nothing`);
    assert.deepEqual(firstSlow.failed, [{ id: stuck.id, reason: 'target_slow' }]);
    // What was accepted before that fits in the kernel's socket buffers plus the relay's bound.
    const bound = (await kernelBufferMax()) + 64 * KIB + 2 * payload.length;
    assert.ok(deliveredBytes <= bound, `${deliveredBytes} bytes were accepted for a peer that reads nothing (bound ${bound})`);
    await pair.roundTrip();

    // Past the bound nothing more is written to it: plain messages fail, queue:true ones are queued.
    const more = 500;
    for (let i = 0; i < more; i++) boss.socket.send({ type: 'message', to: stuck.id, payload, msg_id: `slow-${i}` });
    for (let i = 0; i < 200; i++) boss.socket.send({ type: 'message', to: stuck.id, payload: { i }, msg_id: `later-${i}`, queue: true });
    const tripDuringSlow = pair.roundTrip();
    for (let i = 0; i < more; i++) {
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual([ack.msg_id, ack.delivered, ack.failed], [`slow-${i}`, [], [{ id: stuck.id, reason: 'target_slow' }]]);
    }
    for (let i = 0; i < 200; i++) {
      const ack = await boss.socket.next('delivery_ack');
      assert.deepEqual([ack.msg_id, ack.delivered, ack.queued], [`later-${i}`, [], [stuck.id]]);
    }
    await tripDuringSlow;
    const growth = (await rssBytes(relay.pid)) - rssBefore;
    assert.ok(growth < 100 * 1024 * 1024, `relay RSS grew by ${Math.round(growth / 1048576)} MB (bound 100 MB)`);

    await eventually('the stuck employee is disconnected and shown offline', async () => !(await isOnline(relay!, stuck.id)), 15_000);
    const ended = relay.logLines().filter((line) => line.id === stuck.id);
    assert.deepEqual(ended.map((line) => line.event).filter((e) => e === 'peer_too_slow' || e === 'peer_silent'), ['peer_too_slow']);
    clearInterval(pinger);
    stuck.socket.ws.terminate();
    for (let n = 0; n < 3; n++) await pair.roundTrip();

    // Reconnected and reading again, it gets what was queued for it, in order.
    const back = await reconnect(relay, stuck, 'employee');
    assert.equal(back.ok.type, 'auth_ok');
    for (let i = 0; i < 200; i++) assert.deepEqual((await back.socket.next('message')).payload, { i });
    await Promise.all([back.socket.close(), boss.socket.close(), pair.close()]);
  } finally {
    clearInterval(pinger);
    if (relay) await relay.child.stop('SIGTERM').catch(() => relay!.child.stop('SIGKILL'));
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('a peer silent for two ping intervals is terminated, shown offline, and its disconnect is in connections.db', async () => {
  const logs: Record<string, unknown>[] = [];
  const logger = createLogger('info', (line) => logs.push(JSON.parse(line) as Record<string, unknown>));
  const pingIntervalMs = 200;
  const env = await startTestRelay({ pingIntervalMs, logger });
  try {
    const silent = await authEmployee(env.relay, 'Silent', ['quiet']);
    const healthy = await authEmployee(env.relay, 'Healthy', ['quiet']);
    stopReading(silent.socket.ws);
    await eventually('the silent employee shows offline', async () => !(await isOnline(env.relay, silent.id)), 10_000);
    const silentLog = logs.find((line) => line.event === 'peer_silent' && line.id === silent.id);
    assert.ok(silentLog, 'the relay logs why it ended the peer');
    assert.ok(Number(silentLog.silent_ms) > 2 * pingIntervalMs);

    // A peer that answers the protocol pings stays, however long it says nothing itself.
    await sleep(4 * pingIntervalMs);
    assert.equal(await isOnline(env.relay, healthy.id), true);
    const boss = await authBoss(env.relay);
    boss.socket.send({ type: 'message', to: [healthy.id, silent.id], payload: 'still here?' });
    const ack = await boss.socket.next('delivery_ack');
    assert.deepEqual([ack.delivered, ack.failed], [[healthy.id], [{ id: silent.id, reason: 'target_offline' }]]);
    assert.equal((await healthy.socket.next('message')).payload, 'still here?');
    silent.socket.ws.terminate();
    await Promise.all([healthy.socket.close(), boss.socket.close()]);
    await env.relay.close();

    const events = (await fs.readFile(path.join(env.dataDir, 'connections.db'), 'utf8'))
      .split('\n')
      .filter((line) => line !== '')
      .map((line) => JSON.parse(line) as Record<string, unknown>)
      .filter((event) => event.identityId === silent.id);
    assert.deepEqual(
      events.map((event) => [event.event, event.online, event.code ?? null]),
      [
        ['auth_ok', true, null],
        ['disconnect', false, 1006],
      ],
      'the terminated socket (close code 1006) is logged as a disconnect',
    );
  } finally {
    await env.dispose();
  }
});
