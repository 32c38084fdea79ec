// Identity lifecycle over real sockets and HTTP: DELETE /api/identities/:id, POST
// /api/identities/:id/rotate-key, --forget-offline-after, and `mimiclaw-ws send` leaving no
// identity behind.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parseCommandLine, UsageError } from '../lib/cli-args';
import { resolveOptions } from '../lib/options';
import { CLOSE_CODES } from '../lib/protocol';
import { eventually } from './fault-support';

/** The socket's close code; fails instead of hanging when the relay does not close it. */
async function closeCode(socket: TestSocket, timeoutMs = 10_000): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`socket not closed within ${timeoutMs} ms`)), timeoutMs)));
  try {
    return (await Promise.race([socket.closed, timeout])).code;
  } finally {
    clearTimeout(timer);
  }
}
import { authBoss, authEmployee, http, reconnect, startTestRelay, TEST_AUTHKEY, type RelayEndpoint, type TestSocket } from './support';

const CLI = path.join(__dirname, '..', 'cli.js');

async function connectionIds(relay: RelayEndpoint, role?: 'boss' | 'employee'): Promise<string[]> {
  const { status, body } = await http(relay, 'GET', '/api/connections');
  assert.equal(status, 200);
  const nodes = body.connections as { id: string; role: string }[];
  return nodes.filter((node) => role === undefined || node.role === role).map((node) => node.id);
}

function runSend(relay: RelayEndpoint, to: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, 'send', relay.url, '--authkey', TEST_AUTHKEY, '--to', to, '--payload', '{"task":"x"}'], {
      env: { PATH: process.env.PATH, HOME: process.env.HOME },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 30_000,
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('DELETE /api/identities/:id', () => {
  test('an offline identity is removed with its queue: the answer counts the dropped messages and its reconnect gets identity_not_found, also after a restart', async () => {
    let env = await startTestRelay();
    try {
      const worker = await authEmployee(env.relay, 'Leaver', ['ops']);
      await worker.socket.close();
      const boss = await authBoss(env.relay);
      for (const msgId of ['q-1', 'q-2']) {
        boss.socket.send({ type: 'message', to: worker.id, payload: { n: msgId }, msg_id: msgId, queue: true });
        const ack = await boss.socket.next('delivery_ack');
        assert.deepEqual(ack.queued, [worker.id]);
      }

      const answer = await http(env.relay, 'DELETE', `/api/identities/${encodeURIComponent(worker.id)}`, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200, JSON.stringify(answer.body));
      assert.deepEqual(answer.body, { id: worker.id, role: 'employee', name: 'Leaver', deleted: true, was_online: false, dropped_queued: 2 });
      // The sender hears that its queued copies will never be delivered.
      for (const msgId of ['q-1', 'q-2']) {
        const update = await boss.socket.next((f) => f.type === 'delivery_update' && f.msg_id === msgId);
        assert.equal(update.status, 'expired');
        assert.equal(update.id, worker.id);
      }
      assert.ok(!(await connectionIds(env.relay)).includes(worker.id));

      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal(back.ok.type, 'error');
      assert.equal(back.ok.code, 'identity_not_found');
      await closeCode(back.socket);

      await boss.socket.close();
      env = await env.restart();
      assert.ok(!(await connectionIds(env.relay)).includes(worker.id), 'the removal must be on disk');
      const afterRestart = await reconnect(env.relay, worker, 'employee');
      assert.equal(afterRestart.ok.code, 'identity_not_found');
      await closeCode(afterRestart.socket);
      const metrics = await fetch(`${env.relay.httpUrl}/metrics`).then((r) => r.text());
      // A cluster node labels its metrics with its node id.
      assert.match(metrics, /mimiclaw_queue_depth(\{[^}]*\})? 0\b/, 'the dropped messages must not come back from queue.db');
    } finally {
      await env.dispose();
    }
  });

  test('an online identity is told, closed with 4010, then removed', async () => {
    const env = await startTestRelay();
    try {
      const worker = await authEmployee(env.relay, 'Online', ['ops']);
      const answer = await http(env.relay, 'DELETE', `/api/identities/${worker.id}`, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200, JSON.stringify(answer.body));
      assert.equal(answer.body.was_online, true);
      assert.equal(answer.body.dropped_queued, 0);
      const notice = await worker.socket.next('system');
      assert.equal(notice.event, 'identity_deleted');
      assert.equal(notice.by, 'admin-http');
      const code = await closeCode(worker.socket);
      assert.equal(code, CLOSE_CODES.identityDeleted);
      assert.equal(code, 4010);
      assert.ok(!(await connectionIds(env.relay)).includes(worker.id));
      const back = await reconnect(env.relay, worker, 'employee');
      assert.equal(back.ok.code, 'identity_not_found');
      await closeCode(back.socket);
    } finally {
      await env.dispose();
    }
  });

  test('a boss can be deleted too; the routes need the authkey, an unknown id is 404, other methods 405', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const route = `/api/identities/${boss.id}`;
      for (const [method, path] of [['DELETE', route], ['POST', `${route}/rotate-key`]] as const) {
        const missing = await http(env.relay, method, path);
        assert.equal(missing.status, 401, `${method} ${path} without the key`);
        assert.equal(missing.body.code, 'unauthorized');
        const wrong = await http(env.relay, method, path, { authkey: 'not-the-key' });
        assert.equal(wrong.status, 401, `${method} ${path} with a wrong key`);
      }
      for (const [method, path] of [['DELETE', '/api/identities/employee-nobody'], ['POST', '/api/identities/employee-nobody/rotate-key']] as const) {
        const unknown = await http(env.relay, method, path, { authkey: TEST_AUTHKEY });
        assert.equal(unknown.status, 404, `${method} ${path}`);
        assert.equal(unknown.body.code, 'not_found');
        assert.match(String(unknown.body.message), /employee-nobody/);
      }
      const malformed = await http(env.relay, 'DELETE', '/api/identities/%E0%A4%A', { authkey: TEST_AUTHKEY });
      assert.equal(malformed.status, 400);
      assert.equal(malformed.body.code, 'invalid_id');
      assert.equal((await http(env.relay, 'GET', route, { authkey: TEST_AUTHKEY })).status, 405);
      assert.equal((await http(env.relay, 'GET', `${route}/rotate-key`, { authkey: TEST_AUTHKEY })).status, 405);
      // Nothing above touched the boss.
      assert.ok((await connectionIds(env.relay, 'boss')).includes(boss.id));

      const answer = await http(env.relay, 'DELETE', route, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200);
      assert.equal(answer.body.role, 'boss');
      assert.equal(await closeCode(boss.socket), 4010);
      assert.deepEqual(await connectionIds(env.relay, 'boss'), []);
    } finally {
      await env.dispose();
    }
  });
});

describe('POST /api/identities/:id/rotate-key', () => {
  test('answers a new key once: the online session is closed with 4009, the old key is refused, the new one works, also after a restart', async () => {
    let env = await startTestRelay();
    try {
      const worker = await authEmployee(env.relay, 'Rotated', ['ops']);
      const answer = await http(env.relay, 'POST', `/api/identities/${worker.id}/rotate-key`, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200, JSON.stringify(answer.body));
      assert.equal(answer.body.id, worker.id);
      assert.equal(answer.body.was_online, true);
      const newKey = String(answer.body.key);
      assert.match(newKey, /^[0-9a-f]{48}$/);
      assert.notEqual(newKey, worker.key);
      assert.equal(answer.headers.get('cache-control'), 'no-store');

      const notice = await worker.socket.next('system');
      assert.equal(notice.event, 'key_rotated');
      assert.equal(await closeCode(worker.socket), CLOSE_CODES.credentialsChanged);
      assert.equal(CLOSE_CODES.credentialsChanged, 4009);

      const old = await reconnect(env.relay, worker, 'employee');
      assert.equal(old.ok.type, 'error');
      assert.equal(old.ok.code, 'invalid_identity_key');
      await closeCode(old.socket);

      const fresh = await reconnect(env.relay, { id: worker.id, key: newKey }, 'employee');
      assert.equal(fresh.ok.type, 'auth_ok');
      assert.equal(fresh.ok.reconnected, true);
      assert.equal(fresh.ok.key, newKey);
      await fresh.socket.close();

      env = await env.restart();
      const stale = await reconnect(env.relay, worker, 'employee');
      assert.equal(stale.ok.code, 'invalid_identity_key', 'the old key must stay refused after a restart');
      await closeCode(stale.socket);
      const kept = await reconnect(env.relay, { id: worker.id, key: newKey }, 'employee');
      assert.equal(kept.ok.type, 'auth_ok', 'the new key must be on disk');
      await kept.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('an offline identity gets a new key without anything being closed', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      await boss.socket.close();
      const answer = await http(env.relay, 'POST', `/api/identities/${boss.id}/rotate-key`, { authkey: TEST_AUTHKEY });
      assert.equal(answer.status, 200);
      assert.equal(answer.body.was_online, false);
      const back = await reconnect(env.relay, { id: boss.id, key: String(answer.body.key) }, 'boss', { authkey: TEST_AUTHKEY });
      assert.equal(back.ok.type, 'auth_ok');
      await back.socket.close();
    } finally {
      await env.dispose();
    }
  });
});

describe('--forget-offline-after', () => {
  test('removes identities offline that long and keeps online ones, however old', async () => {
    const env = await startTestRelay({ forgetOfflineAfterMs: 300, maintenanceIntervalMs: 1000 });
    try {
      const gone = await authEmployee(env.relay, 'Gone', ['ops']);
      const stays = await authEmployee(env.relay, 'Stays', ['ops']);
      await gone.socket.close();
      await eventually('the offline identity is forgotten', async () => !(await connectionIds(env.relay)).includes(gone.id));
      // The online one has been connected longer than the threshold by now, and is kept.
      assert.ok((await connectionIds(env.relay)).includes(stays.id));
      const back = await reconnect(env.relay, gone, 'employee');
      assert.equal(back.ok.code, 'identity_not_found');
      await closeCode(back.socket);
      await stays.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('is off by default; the flag takes a duration and a bad one is refused naming the flag', () => {
    assert.equal(resolveOptions({ authkey: 'k' }).forgetOfflineAfterMs, 0);
    const parsed = parseCommandLine(['8787', 'k', '--forget-offline-after', '30d']);
    assert.equal(parsed.kind, 'run');
    assert.equal(parsed.kind === 'run' && parsed.options.forgetOfflineAfterMs, 30 * 24 * 3600 * 1000);
    assert.throws(() => parseCommandLine(['8787', 'k', '--forget-offline-after', 'soon']), (error: Error) => {
      assert.ok(error instanceof UsageError);
      assert.match(error.message, /--forget-offline-after/);
      assert.match(error.message, /"soon"/);
      return true;
    });
  });
});

describe('mimiclaw-ws send without --identity-file', () => {
  test('leaves no boss identity behind, run after run', async () => {
    const env = await startTestRelay();
    try {
      const worker = await authEmployee(env.relay, 'Target', ['ops']);
      for (let run = 1; run <= 2; run++) {
        const result = await runSend(env.relay, worker.id);
        assert.equal(result.code, 0, `run ${run}: ${result.stderr}`);
        await worker.socket.next('message');
      }
      await eventually('the senders are forgotten', async () => (await connectionIds(env.relay, 'boss')).length === 0);
      assert.deepEqual(await connectionIds(env.relay, 'boss'), []);
      await worker.socket.close();
    } finally {
      await env.dispose();
    }
  });

  test('an ephemeral auth with "identity" is refused', async () => {
    const env = await startTestRelay();
    try {
      const boss = await authBoss(env.relay);
      const back = await reconnect(env.relay, boss, 'boss', { authkey: TEST_AUTHKEY, ephemeral: true });
      assert.equal(back.ok.type, 'error');
      assert.equal(back.ok.code, 'invalid_frame');
      await closeCode(back.socket);
      await boss.socket.close();
    } finally {
      await env.dispose();
    }
  });
});
