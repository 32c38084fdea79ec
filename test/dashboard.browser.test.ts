// The dashboard in headless Chromium against a real relay: an employee appears when it
// connects, a message appears in the live feed (payload on click), and banning it from the
// page turns it banned and closes its socket. A screenshot is saved in the test's temp dir.

import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { authBoss, authEmployee, http, type Authed, makeTempDir, startTestRelay, TEST_AUTHKEY, TEST_CLUSTER_NODES, type TestRelay } from './support';

export const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

describe('dashboard in a browser', { timeout: 60_000 }, () => {
  let relay: TestRelay;
  let browser: Browser;
  let page: Page;
  let shotsDir: string;
  const pageErrors: string[] = [];
  /** Every API response the page received: path and status. */
  const responses: { path: string; status: number; method: string }[] = [];
  const workforceFetches = () => responses.filter((r) => r.path === '/api/admin/workforce').length;
  /** The cluster node the workforce view places an online employee on. */
  const nodeHolding = async (id: string): Promise<string> => {
    const { body } = await http(relay.relay, 'GET', '/api/admin/workforce', { authkey: TEST_AUTHKEY });
    const employee = (body.employees as { id: string; node?: unknown }[]).find((e) => e.id === id);
    assert.ok(typeof employee?.node === 'string' && /^node-\d+$/.test(employee.node), `a cluster node holds ${id}: ${JSON.stringify(employee?.node)}`);
    return employee.node;
  };

  before(async () => {
    relay = await startTestRelay();
    shotsDir = await makeTempDir('mimiclaw-dashboard-');
    browser = await chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on('pageerror', (error) => pageErrors.push(error.message));
    page.on('response', (response) => responses.push({ path: new URL(response.url()).pathname, status: response.status(), method: response.request().method() }));
    page.setDefaultTimeout(10_000);
  });
  after(async () => {
    await browser?.close();
    await relay.dispose();
    await fs.rm(shotsDir, { recursive: true, force: true });
  });

  test('serves one self-contained page at /, /admin, /admin/ and /index.html', async () => {
    for (const route of ['/', '/admin', '/admin/', '/index.html']) {
      const response = await fetch(relay.relay.httpUrl + route);
      assert.equal(response.status, 200, route);
      assert.match(response.headers.get('content-type') ?? '', /^text\/html/);
      const html = await response.text();
      assert.match(html, /<title>mimiclaw-ws dashboard<\/title>/);
      assert.doesNotMatch(html, /<script[^>]+src=|<link[^>]+href=|https?:\/\/(?!relay\.local)/, 'the page must not load anything from elsewhere');
    }
  });

  test('shows a connecting employee, its message in the feed, and bans it', async () => {
    await page.goto(relay.relay.httpUrl + '/');
    await page.locator('#live.on').waitFor();

    const worker = await authEmployee(relay.relay, 'Browser-Worker', ['research', 'risk']);
    const row = page.locator(`#employees-body tr[data-id="${worker.id}"]`);
    await row.waitFor();
    assert.equal(await row.locator('td').first().textContent(), 'Browser-Worker');
    await row.locator('.status-online').waitFor();
    // The relay node holding its socket (from the connect event): behind a balancer, whichever
    // node the round robin gave it, as the workforce view names it.
    const holder = TEST_CLUSTER_NODES === 0 ? relay.relay.nodeId : await nodeHolding(worker.id);
    await row.getByText(`on ${holder}`).waitFor();
    assert.deepEqual(await row.locator('.chip').allTextContents(), ['research', 'risk']);
    // The health self-report arrives via the event stream and patches the row: no re-fetch.
    worker.socket.send({ type: 'health_report', valid: true });
    await worker.socket.next('health_report_ack');
    await row.locator('.health-healthy').waitFor();

    const boss = await authBoss(relay.relay);
    // A connected boss is healthy without a self report; the summary follows the events.
    await page.locator(`#bosses-body tr[data-id="${boss.id}"] .health-healthy`).waitFor();
    await page.locator('#summary', { hasText: 'Healthy 2' }).waitFor();
    boss.socket.send({ type: 'message', to: worker.id, payload: { task: 'summarise the quarterly report' }, msg_id: 'browser-msg-1' });
    await worker.socket.next('message');
    const item = page.locator('#feed li', { hasText: 'Browser-Worker:' }).filter({ hasText: '1 delivered' });
    await item.waitFor();
    await item.getByRole('button', { name: /payload/i }).click();
    await page.locator('#payload-body', { hasText: 'summarise the quarterly report' }).waitFor();
    await page.locator('#payload-dialog button[value="close"]').click();

    // The communications log picks the message up without a reload.
    await page.locator('#comms-body tr', { hasText: 'browser-msg-1' }).waitFor();

    // Ban: the page asks for the key first (writes need it even on loopback), then bans.
    await row.getByRole('button', { name: 'Ban Browser-Worker' }).click();
    await page.locator('#key-dialog[open]').waitFor();
    assert.deepEqual(responses.filter((r) => r.path.endsWith('/ban')), [], 'no ban request may go out before the key is given');
    await page.getByLabel('Relay authkey').fill(TEST_AUTHKEY);
    await page.locator('#key-dialog button[value="ok"]').click();
    await row.locator('.status-banned').waitFor();
    assert.equal((await worker.socket.closed).code, 4008);
    await page.locator('#feed li', { hasText: 'Browser-Worker (employee) banned by' }).waitFor();
    const listed = await http(relay.relay, 'GET', '/api/employees');
    const stored = (listed.body.employees as { id: string; banned: boolean }[]).find((e) => e.id === worker.id);
    assert.equal(stored?.banned, true);
    assert.deepEqual(responses.filter((r) => r.path.endsWith('/ban')).map((r) => r.status), [200], 'one ban request, with the key');

    // Unban uses the key kept for the tab: no second prompt.
    await row.getByRole('button', { name: 'Unban Browser-Worker' }).click();
    await row.locator('.status-offline').waitFor();
    assert.equal(await page.locator('#key-dialog[open]').count(), 0);
    assert.equal(await page.evaluate(() => (globalThis as unknown as { sessionStorage: { getItem(k: string): string | null } }).sessionStorage.getItem('mimiclaw-admin-key')), TEST_AUTHKEY);

    const shot = path.join(shotsDir, 'dashboard.png');
    await page.screenshot({ path: shot, fullPage: true });
    assert.ok((await fs.stat(shot)).size > 10_000, 'the screenshot should hold a rendered page');
    // The temp dir is removed after the run; set DASHBOARD_SCREENSHOT=path to keep a copy.
    if (process.env.DASHBOARD_SCREENSHOT) await fs.copyFile(shot, process.env.DASHBOARD_SCREENSHOT);
    assert.deepEqual(pageErrors, []);
    await boss.socket.close();
  });

  test('the tag filter hides rows without re-rendering them', async () => {
    const other = await authEmployee(relay.relay, 'Filter-Other', ['ops']);
    const otherRow = page.locator(`#employees-body tr[data-id="${other.id}"]`);
    await otherRow.waitFor();
    const marker = await otherRow.evaluate((tr: object) => ((tr as { marker?: number }).marker = 42));
    await page.selectOption('#tag-filter', 'research');
    assert.equal(await otherRow.isHidden(), true);
    assert.equal(await page.locator('#employees-body tr:not([hidden])', { hasText: 'Browser-Worker' }).count(), 1);
    await page.selectOption('#tag-filter', '');
    assert.equal(await otherRow.isVisible(), true);
    assert.equal(await otherRow.evaluate((tr: object) => (tr as { marker?: number }).marker), marker, 'the row element is kept, not rebuilt');
    await other.socket.close();
  });

  test('with 1,000 employees every one gets exactly one row, and events still patch rows', async () => {
    const workers: Authed[] = [];
    for (let i = 0; i < 1000; i += 100) {
      workers.push(...(await Promise.all(Array.from({ length: 100 }, (_, j) => authEmployee(relay.relay, `Bulk-${i + j}`, [`team-${(i + j) % 10}`])))));
    }
    try {
      await page.locator(`#employees-body tr[data-id="${workers.at(-1)!.id}"] .status-online`).waitFor({ timeout: 30_000 });
      const ids = await page.locator('#employees-body tr').evaluateAll((rows) => rows.map((row) => (row as unknown as { dataset: { id: string } }).dataset.id));
      assert.equal(new Set(ids).size, ids.length, 'no employee may have two rows');
      for (const w of workers) assert.ok(ids.includes(w.id));
      await workers[500]!.socket.close();
      await page.locator(`#employees-body tr[data-id="${workers[500]!.id}"] .status-offline`).waitFor();
      await page.selectOption('#tag-filter', 'team-3');
      assert.equal(await page.locator('#employees-body tr:not([hidden])').count(), 100);
      await page.selectOption('#tag-filter', '');
      await page.locator('#summary', { hasText: /Employees 10\d\d/ }).waitFor();
      // The rows and the summary were patched from events: the workforce was fetched once, at
      // load. A re-fetch would follow an event by 1.5 s at most, so give it that long to show.
      await new Promise((resolve) => setTimeout(resolve, 2000));
      assert.equal(workforceFetches(), 1, 'connects and disconnects must not re-fetch /api/admin/workforce');
      assert.deepEqual(pageErrors, []);
    } finally {
      await Promise.all(workers.map((w) => w.socket.close()));
    }
  });

  test('long unbroken names and tags wrap or truncate instead of widening the table', async () => {
    const longName = 'Very' + 'LongUnbrokenEmployeeName'.repeat(12);
    const longTag = 'tag-' + 'x'.repeat(180);
    const wide = await authEmployee(relay.relay, longName, [longTag, 'short']);
    try {
      const row = page.locator(`#employees-body tr[data-id="${wide.id}"]`);
      await row.waitFor();
      const scroller = page.locator('section[aria-labelledby="employees-title"] .scroll');
      const { scrollWidth, clientWidth } = await scroller.evaluate((node) => {
        const box = node as unknown as { scrollWidth: number; clientWidth: number };
        return { scrollWidth: box.scrollWidth, clientWidth: box.clientWidth };
      });
      assert.ok(scrollWidth <= clientWidth + 1, `the employees table must not scroll sideways (${scrollWidth} > ${clientWidth})`);
      assert.equal(await row.locator('td').first().getAttribute('title'), longName, 'the full name is in a tooltip');
      assert.equal(await row.locator('.chip', { hasText: 'tag-xxx' }).getAttribute('title'), longTag, 'the full tag is in a tooltip');
      const filterWidth = (await page.locator('#tag-filter').boundingBox())!.width;
      assert.ok(filterWidth <= 320, `the tag filter must not stretch to the longest tag (${filterWidth}px)`);
      assert.equal(await page.locator(`#tag-filter option[value="${longTag}"]`).getAttribute('title'), longTag);
      assert.deepEqual(pageErrors, []);
    } finally {
      await wide.socket.close();
    }
  });
});
