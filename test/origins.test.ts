// --allowed-origins: a WebSocket upgrade whose Origin header is present and not listed gets 403
// with a JSON error; a listed Origin and no Origin at all (agents) connect; without the option
// every Origin connects, as before.

import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { RelayClient } from '../client';
import { parseCommandLine } from '../lib/cli-args';
import { resolveOptions } from '../lib/options';
import { startRelay } from '../server';
import { startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';
import { within } from './tls-support';

interface UpgradeOutcome {
  status: number;
  body: string;
}

/** Opens a WebSocket with `origin` (or none): 101 with the hello frame, or the refusal's status and body. */
function upgrade(url: string, origin?: string): Promise<UpgradeOutcome> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, origin === undefined ? {} : { origin });
    ws.once('message', (data) => {
      resolve({ status: 101, body: data.toString() });
      ws.close();
    });
    ws.once('unexpected-response', (_request, response: http.IncomingMessage) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (body += chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
    });
    ws.once('error', (error) => {
      if (!/Unexpected server response/.test(error.message)) reject(error);
    });
  });
}

describe('--allowed-origins', () => {
  let env: TestRelay;
  before(async () => {
    env = await startTestRelay({ allowedOrigins: ['https://app.example.com', 'http://localhost:3000'] });
  });
  after(async () => {
    await env.dispose();
  });

  test('an Origin that is not listed gets 403 with code origin_not_allowed', async () => {
    const refused = await upgrade(env.relay.url, 'https://evil.example.com');
    assert.equal(refused.status, 403);
    const body = JSON.parse(refused.body) as { code: string; message: string };
    assert.equal(body.code, 'origin_not_allowed');
    assert.match(body.message, /https:\/\/evil\.example\.com .*--allowed-origins/);
    assert.equal((await upgrade(env.relay.url, 'http://localhost:3001')).status, 403);
    assert.equal((await upgrade(env.relay.url, 'http://app.example.com')).status, 403);
    assert.equal((await upgrade(env.relay.url, 'null')).status, 403);
  });

  test('a listed Origin connects, however its case or default port is written', async () => {
    for (const origin of ['https://app.example.com', 'https://APP.example.com:443', 'http://localhost:3000']) {
      const outcome = await upgrade(env.relay.url, origin);
      assert.equal(outcome.status, 101, origin);
      assert.equal((JSON.parse(outcome.body) as { type: string }).type, 'hello');
    }
  });

  test('no Origin header (agents, RelayClient) connects', async () => {
    assert.equal((await upgrade(env.relay.url)).status, 101);
    const boss = new RelayClient({ url: env.relay.url, role: 'boss', authkey: TEST_AUTHKEY, heartbeatIntervalMs: 0 });
    try {
      assert.equal((await within(boss.connect(), 30_000, 'the boss to connect')).role, 'boss');
    } finally {
      await boss.close();
    }
  });

  test('the HTTP API is not affected: /health answers whatever the Origin', async () => {
    const response = await fetch(`${env.relay.httpUrl}/health`, { headers: { origin: 'https://evil.example.com' } });
    assert.equal(response.status, 200);
  });
});

describe('--allowed-origins: default and validation', () => {
  test('without it any Origin connects, as before', async () => {
    const env = await startTestRelay();
    try {
      assert.equal((await upgrade(env.relay.url, 'https://anywhere.example')).status, 101);
    } finally {
      await env.dispose();
    }
  });

  test('entries that are not origins are refused, naming the flag or the option', async () => {
    const parsed = parseCommandLine(['--authkey', 'k', '--allowed-origins', 'https://a.example, http://localhost:3000'], {});
    assert.deepEqual(parsed.kind === 'run' ? parsed.options.allowedOrigins : undefined, ['https://a.example', 'http://localhost:3000']);
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--allowed-origins', 'a.example'], {}), /--allowed-origins must be a comma-separated list of origins .*got "a\.example"/);
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--allowed-origins', 'https://a.example/path'], {}), /--allowed-origins .*got "https:\/\/a\.example\/path"/);
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--allowed-origins', ','], {}), /--allowed-origins must be/);
    assert.throws(() => parseCommandLine(['--authkey', 'k', '--allowed-origins'], {}), /--allowed-origins needs a value/);
    assert.throws(() => resolveOptions({ authkey: 'k', allowedOrigins: ['ftp://x'] }), /allowedOrigins entries must be origins/);
    await assert.rejects(startRelay({ authkey: 'k', port: 0, allowedOrigins: ['*'] }), /allowedOrigins entries must be origins .*got "\*"/);
  });
});
