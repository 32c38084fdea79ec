// The dashboard's dispatch view in headless Chromium: an employee's Work cell turns busy while it
// holds a task and idle once it answers, and the task queue shows what waits per tag.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { authBoss, authEmployee, startTestRelay, type TestRelay } from './support';

const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

let relay: TestRelay;
let browser: Browser;
let page: Page;
const pageErrors: string[] = [];

before(async () => {
  relay = await startTestRelay();
  browser = await chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS });
  page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.setDefaultTimeout(10_000);
});
after(async () => {
  await browser?.close();
  await relay.dispose();
});

test('busy and idle employees, and the waiting queue per tag', { timeout: 60_000 }, async () => {
  await page.goto(relay.relay.httpUrl + '/');
  await page.locator('#live.on').waitFor();
  await page.locator('#tasks-body', { hasText: 'No tasks waiting or in progress.' }).waitFor();

  const worker = await authEmployee(relay.relay, 'Queue-Worker', ['triage'], { capacity: 1 });
  const row = page.locator(`#employees-body tr[data-id="${worker.id}"]`);
  await row.locator('.work-idle', { hasText: 'idle 0/' }).waitFor();
  // A status frame shows at once (an availability event), without waiting for a workforce read.
  worker.socket.send({ type: 'status', status: 'dnd' });
  await worker.socket.next('status_ack');
  await row.locator('.work-busy', { hasText: 'dnd 0/1' }).waitFor();
  worker.socket.send({ type: 'status', status: 'idle' });
  await worker.socket.next('status_ack');
  await row.locator('.work-idle', { hasText: 'idle 0/1' }).waitFor();

  const boss = await authBoss(relay.relay);
  for (const msgId of ['q-1', 'q-2', 'q-3']) {
    boss.socket.send({ type: 'message', to: 'any:triage', payload: msgId, msg_id: msgId, queue: true });
    await boss.socket.next('delivery_ack');
  }
  await row.locator('.work-busy', { hasText: 'busy 1/1' }).waitFor();
  const queueRow = page.locator('#tasks-body tr[data-tag="triage"]');
  await queueRow.waitFor();
  assert.deepEqual(await queueRow.locator('td').allTextContents(), ['triage', '2', '1']);
  await page.locator('#feed li', { hasText: 'any:triage task q-1 assigned to Queue-Worker' }).waitFor();

  for (const msgId of ['q-1', 'q-2', 'q-3']) {
    const task = await worker.socket.next('message');
    assert.equal(task.msg_id, msgId);
    worker.socket.send({ type: 'task_done', msg_id: msgId });
  }
  await row.locator('.work-idle', { hasText: 'idle 0/1' }).waitFor();
  await page.locator('#tasks-body', { hasText: 'No tasks waiting or in progress.' }).waitFor();
  assert.deepEqual(pageErrors, []);
});
