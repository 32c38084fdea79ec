// Starts a relay on loopback with a sample workforce, opens the dashboard in headless Chromium
// and saves a screenshot. Also a manual check that the page stays responsive with a large
// workforce: `node dist/scripts/dashboard-screenshot.js --employees 1000 --out /tmp/big.png`.
//
//   npm run build && node dist/scripts/dashboard-screenshot.js [--employees N] [--out FILE] [--dark]

import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import minimist from 'minimist';
import WebSocket from 'ws';
import { chromium } from 'playwright-core';
import { startRelay, type RelayHandle } from '../server';

const AUTHKEY = 'screenshot-secret';
const ROLES = ['Researcher', 'Analyst', 'Writer', 'Reviewer', 'Planner', 'Coder'];
const TAGS = [['research', 'risk'], ['analysis'], ['writing', 'docs'], ['review'], ['planning', 'ops'], ['code', 'ops']];

interface Peer {
  ws: WebSocket;
  id: string;
  next(type: string): Promise<Record<string, unknown>>;
}

function open(relay: RelayHandle, auth: Record<string, unknown>): Promise<Peer> {
  const ws = new WebSocket(relay.url);
  const inbox: Record<string, unknown>[] = [];
  const waiting: { type: string; resolve: (f: Record<string, unknown>) => void }[] = [];
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString()) as Record<string, unknown>;
    const i = waiting.findIndex((w) => w.type === frame.type);
    if (i >= 0) waiting.splice(i, 1)[0]!.resolve(frame);
    else inbox.push(frame);
  });
  const next = (type: string) => {
    const i = inbox.findIndex((f) => f.type === type);
    if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0]!);
    return new Promise<Record<string, unknown>>((resolve) => waiting.push({ type, resolve }));
  };
  return new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('open', async () => {
      ws.send(JSON.stringify({ type: 'auth', ...auth }));
      const ok = await next('auth_ok');
      resolve({ ws, id: String(ok.id), next });
    });
  });
}

async function main(): Promise<void> {
  const args = minimist(process.argv.slice(2), { string: ['out'], boolean: ['dark'], default: { employees: 24, out: 'docs/dashboard.png' } });
  const count = Number(args.employees);
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), 'mimiclaw-shot-'));
  const relay = await startRelay({ port: 0, host: '127.0.0.1', authkey: AUTHKEY, dataDir, logLevel: 'warn' });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1440, height: 1000 }, colorScheme: args.dark ? 'dark' : 'light' });
    await page.goto(relay.httpUrl + '/');
    await page.locator('#live.on').waitFor();
    const bosses = [await open(relay, { role: 'boss', authkey: AUTHKEY }), await open(relay, { role: 'boss', authkey: AUTHKEY })];
    const started = Date.now();
    const employees: Peer[] = [];
    for (let i = 0; i < count; i += 50) {
      const batch = Array.from({ length: Math.min(50, count - i) }, (_, j) => {
        const n = i + j;
        return open(relay, { role: 'employee', name: `${ROLES[n % ROLES.length]}-${Math.floor(n / ROLES.length) + 1}`, tags: TAGS[n % TAGS.length], meta: { model: 'local' } });
      });
      employees.push(...(await Promise.all(batch)));
    }
    for (const [n, e] of employees.entries()) if (n % 7 !== 3) e.ws.send(JSON.stringify({ type: 'health_report', valid: n % 11 !== 5, details: { load: n % 4 } }));
    await page.locator('#employees-body tr').nth(count - 1).waitFor({ timeout: 120_000 });
    console.log(`${count} employees shown ${Date.now() - started} ms after the first connected`);

    const tasks = ['summarise the Q3 risk memo', 'draft release notes', 'review PR 42', 'plan next sprint', 'check the vendor list'];
    for (let i = 0; i < 12; i++) {
      const boss = bosses[i % 2]!;
      boss.ws.send(JSON.stringify({ type: 'message', to: employees[i % employees.length]!.id, payload: { task: tasks[i % tasks.length] } }));
      await boss.next('delivery_ack');
    }
    employees[1]!.ws.send(JSON.stringify({ type: 'message', to: bosses[0]!.id, payload: { result: 'memo summarised', pages: 3 } }));
    await bosses[0]!.next('message');
    bosses[1]!.ws.send(JSON.stringify({ type: 'message', to: 'tag:ops', payload: { task: 'rotate the logs' } }));
    await bosses[1]!.next('delivery_ack');
    for (const e of employees.slice(-3)) e.ws.close();
    await fetch(`${relay.httpUrl}/api/employees/${employees[4]!.id}/ban`, { method: 'POST', headers: { 'x-auth-key': AUTHKEY } });

    const eventStarted = Date.now();
    const late = await open(relay, { role: 'employee', name: 'Late-Joiner', tags: ['research'] });
    await page.locator(`#employees-body tr[data-id="${late.id}"]`).waitFor();
    console.log(`one more employee shown ${Date.now() - eventStarted} ms after it connected (with ${count} rows)`);
    await page.waitForTimeout(2000); // let the debounced re-fetches settle before the picture
    await page.screenshot({ path: String(args.out), fullPage: true });
    console.log(`screenshot saved to ${String(args.out)}`);
    for (const peer of [...bosses, ...employees, late]) peer.ws.close();
  } finally {
    await browser.close();
    await relay.close();
    await fs.rm(dataDir, { recursive: true, force: true });
  }
}

main().catch((error: Error) => {
  console.error(error.stack ?? error.message);
  process.exit(1);
});
