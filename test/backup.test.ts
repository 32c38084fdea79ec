// `mimiclaw-ws backup` of a running relay under write load, and `restore` into a fresh dir from
// which the same identities reconnect with their keys.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { verifyDataDir } from '../lib/audit-chain';
import { CHILD_AUTHKEY, startRelayProcess } from './fault-support';
import { authBoss, authEmployee, makeTempDir, reconnect, startTestRelay, type Authed } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, MIMICLAW_RELAY_HOME: '' } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Sends messages one after another (each waits for its ack) until stopped; returns how many were acked. */
function keepSending(boss: Authed, to: string): { stop(): Promise<number> } {
  let running = true;
  let acked = 0;
  const loop = (async () => {
    for (let i = 0; running; i++) {
      const msgId = `load-${i}`;
      // Payloads with a newline escaped inside and a few KiB, so a torn line would show.
      boss.socket.send({ type: 'message', to, msg_id: msgId, payload: { i, text: 'line\nbreak '.repeat(200) } });
      await boss.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === msgId, 15_000);
      acked++;
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return acked;
    },
  };
}

function storeLines(text: string): string[] {
  return text.split('\n').filter((line) => line.trim() !== '');
}

test('backup of a running relay under write load has only whole lines, and restores into a fresh dir where boss and employee reconnect', async () => {
  const source = await makeTempDir();
  const fresh = await makeTempDir();
  const bundle = path.join(await makeTempDir(), 'relay.backup');
  const relay = await startRelayProcess(source);
  try {
    const boss = await authBoss(relay, CHILD_AUTHKEY);
    const worker = await authEmployee(relay, 'Keeper', ['backup']);
    const load = keepSending(boss, worker.id);
    // Wait until the log is well under way, then back up while the sends go on.
    for (let size = 0; size < 200_000; ) size = (await fs.stat(path.join(source, 'messages.db')).catch(() => ({ size: 0 }))).size;
    const backup = await runCli(['backup', '--data-dir', source, '--out', bundle]);
    const sent = await load.stop();
    assert.equal(backup.code, 0, backup.stderr);
    assert.match(backup.stdout, /^backup written to .*messages\.db \d+ bytes/);

    const restore = await runCli(['restore', '--data-dir', fresh, '--in', bundle]);
    assert.equal(restore.code, 0, restore.stderr);
    assert.match(restore.stdout, /^restored into /);
    for (const name of ['identities.db', 'connections.db', 'messages.db']) {
      const text = await fs.readFile(path.join(fresh, name), 'utf8');
      assert.ok(text.endsWith('\n'), `${name} ends with a complete line`);
      for (const line of storeLines(text)) assert.doesNotThrow(() => JSON.parse(line), `${name}: a torn line: ${line.slice(0, 80)}`);
    }
    const copied = storeLines(await fs.readFile(path.join(fresh, 'messages.db'), 'utf8')).length;
    assert.ok(copied > 0 && copied <= sent, `copied ${copied} of ${sent} messages`);
    const audit = await verifyDataDir(fresh);
    assert.equal(audit.intact, true, JSON.stringify(audit.first_broken));
    assert.equal(audit.files.find((f) => f.file === 'messages.db')?.checked, copied);

    // Restoring over a dir that holds data needs --force; over a running relay's dir it is refused.
    const again = await runCli(['restore', '--data-dir', fresh, '--in', bundle]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /is not empty .*--force/);
    await fs.writeFile(path.join(source, 'relay.lock'), `${relay.pid}\n`, { flag: 'wx' }).catch(() => undefined);
    const busy = await runCli(['restore', '--data-dir', source, '--in', bundle, '--force']);
    assert.equal(busy.code, 1);
    assert.match(busy.stderr, new RegExp(`A relay \\(pid ${relay.pid}\\) is running on`));

    await boss.socket.close();
    await worker.socket.close();
    relay.child.child.kill('SIGTERM');
    await relay.child.exited;

    const restored = await startTestRelay({ authkey: CHILD_AUTHKEY }, fresh);
    try {
      const employeeBack = await reconnect(restored.relay, worker, 'employee');
      assert.equal(employeeBack.ok.type, 'auth_ok', JSON.stringify(employeeBack.ok));
      assert.equal(employeeBack.ok.id, worker.id);
      const bossBack = await reconnect(restored.relay, boss, 'boss', { authkey: CHILD_AUTHKEY });
      assert.equal(bossBack.ok.type, 'auth_ok', JSON.stringify(bossBack.ok));
      assert.equal(bossBack.ok.id, boss.id);
      bossBack.socket.send({ type: 'message', to: worker.id, msg_id: 'after-restore', payload: { ok: true } });
      const ack = await bossBack.socket.next((f) => f.type === 'delivery_ack' && f.msg_id === 'after-restore');
      assert.deepEqual(ack.delivered, [worker.id]);
      await employeeBack.socket.next((f) => f.type === 'message' && f.msg_id === 'after-restore');
      await employeeBack.socket.close();
      await bossBack.socket.close();
    } finally {
      await restored.relay.close();
    }
  } finally {
    if (relay.child.child.exitCode === null && relay.child.child.signalCode === null) {
      relay.child.child.kill('SIGKILL');
      await relay.child.exited;
    }
    await Promise.all([source, fresh, path.dirname(bundle)].map((dir) => fs.rm(dir, { recursive: true, force: true })));
  }
});

test('restore refuses a damaged or cut-short bundle and leaves the dir as it was', async () => {
  const relay = await startTestRelay();
  const bundleDir = await makeTempDir();
  const target = await makeTempDir();
  try {
    await authEmployee(relay.relay, 'Solo', ['x']).then((a) => a.socket.close());
    await relay.relay.close();
    const bundle = path.join(bundleDir, 'b.backup');
    assert.equal((await runCli(['backup', '--data-dir', relay.dataDir, '--out', bundle])).code, 0);
    const whole = await fs.readFile(bundle);

    await fs.writeFile(bundle, whole.subarray(0, whole.length - 40));
    const cut = await runCli(['restore', '--data-dir', target, bundle]);
    assert.equal(cut.code, 1);
    assert.match(cut.stderr, /not a complete mimiclaw-ws backup/);
    assert.deepEqual(await fs.readdir(target), []);

    const flipped = Buffer.from(whole);
    const at = flipped.indexOf('"name":"Solo"');
    flipped[at + 9] = 'X'.charCodeAt(0);
    await fs.writeFile(bundle, flipped);
    const damaged = await runCli(['restore', '--data-dir', target, bundle]);
    assert.equal(damaged.code, 1);
    assert.match(damaged.stderr, /identities\.db does not match its SHA-256/);
    assert.deepEqual(await fs.readdir(target), []);

    const usage = await runCli(['restore', '--data-dir', target]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /missing --in FILE/);
    const noOut = await runCli(['backup', '--data-dir', relay.dataDir]);
    assert.equal(noOut.code, 2);
    assert.match(noOut.stderr, /missing --out FILE/);
    const nowhere = await runCli(['backup', '--data-dir', relay.dataDir, '--out', path.join(bundleDir, 'missing', 'b.backup')]);
    assert.equal(nowhere.code, 1);
    assert.match(nowhere.stderr, /Cannot write the backup next to .*missing/);
  } finally {
    await relay.dispose();
    await fs.rm(bundleDir, { recursive: true, force: true });
    await fs.rm(target, { recursive: true, force: true });
  }
});
