// The dashboard's Rotate key and Delete buttons in headless Chromium against a real relay: each
// asks for confirmation (Cancel sends nothing), then for the admin key, then acts; the rotated
// key is shown once; a deleted row goes away; a boss row names the boss key it used.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { authBoss, authEmployee, connect, http, reconnect, startTestRelay, TEST_AUTHKEY, type TestRelay } from './support';

// As in dashboard.browser.test.ts (importing that file would run its tests here too).
const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

describe('dashboard: rotate key and delete', { timeout: 60_000 }, () => {
  let relay: TestRelay;
  let browser: Browser;
  let page: Page;
  const pageErrors: string[] = [];
  const writes: { path: string; method: string; status: number }[] = [];

  before(async () => {
    relay = await startTestRelay();
    browser = await chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on('pageerror', (error) => pageErrors.push(error.message));
    page.on('response', (response) => {
      const method = response.request().method();
      if (method !== 'GET') writes.push({ path: new URL(response.url()).pathname, method, status: response.status() });
    });
    page.setDefaultTimeout(10_000);
  });
  after(async () => {
    await browser?.close();
    await relay.dispose();
  });

  test('rotate and delete ask first, then act; the boss row shows its key name', async () => {
    await page.goto(relay.relay.httpUrl + '/');
    await page.locator('#live.on').waitFor();
    const worker = await authEmployee(relay.relay, 'Lifecycle-Worker', ['ops']);
    const boss = await authBoss(relay.relay);
    const row = page.locator(`#employees-body tr[data-id="${worker.id}"]`);
    await row.locator('.status-online').waitFor();
    const bossRow = page.locator(`#bosses-body tr[data-id="${boss.id}"]`);
    await bossRow.locator('td', { hasText: 'authkey' }).waitFor();

    // Cancel: nothing is sent.
    await row.getByRole('button', { name: 'Rotate the key of Lifecycle-Worker' }).click();
    await page.locator('#confirm-dialog[open]').waitFor();
    await page.locator('#confirm-dialog button[value="cancel"]').click();
    assert.equal(await page.locator('#key-dialog[open]').count(), 0);
    assert.equal(writes.length, 0);

    // Confirm, then the key is asked for, then the new key is shown once.
    await row.getByRole('button', { name: 'Rotate the key of Lifecycle-Worker' }).click();
    await page.locator('#confirm-dialog button[value="ok"]').click();
    await page.locator('#key-dialog[open]').waitFor();
    assert.equal(writes.length, 0, 'no request before the key is given');
    await page.getByLabel('Relay authkey').fill(TEST_AUTHKEY);
    await page.locator('#key-dialog button[value="ok"]').click();
    await page.locator('#rotated-dialog[open]').waitFor();
    const newKey = await page.locator('#rotated-key').inputValue();
    assert.match(newKey, /^[0-9a-f]{48}$/);
    assert.equal((await worker.socket.closed).code, 4009);
    await page.locator('#rotated-dialog button[value="close"]').click();
    await page.locator('#feed li', { hasText: 'Lifecycle-Worker (employee) key rotated by' }).waitFor();
    const back = await reconnect(relay.relay, { id: worker.id, key: newKey }, 'employee');
    assert.equal(back.ok.type, 'auth_ok', 'the key the page showed works');
    await row.locator('.status-online').waitFor();

    // Delete (the key is kept for the tab): the row goes, the socket is closed with 4010.
    await row.getByRole('button', { name: 'Delete Lifecycle-Worker' }).click();
    await page.locator('#confirm-dialog[open]').waitFor();
    await page.locator('#confirm-dialog button[value="ok"]').click();
    await row.waitFor({ state: 'detached' });
    assert.equal((await back.socket.closed).code, 4010);
    assert.equal(await page.locator('#key-dialog[open]').count(), 0);
    const listed = await http(relay.relay, 'GET', '/api/connections');
    assert.ok(!(listed.body.connections as { id: string }[]).some((n) => n.id === worker.id));
    assert.deepEqual(writes.map((w) => [w.method, w.status]), [['POST', 200], ['DELETE', 200]]);

    // A boss deleted from elsewhere leaves the page through the event stream.
    await http(relay.relay, 'DELETE', `/api/identities/${boss.id}`, { authkey: TEST_AUTHKEY });
    await bossRow.waitFor({ state: 'detached' });
    await page.locator('#feed li', { hasText: 'deleted by admin-http' }).first().waitFor();
    assert.deepEqual(pageErrors, []);
    // The relay is still fine.
    const probe = await connect(relay.relay);
    await probe.close();
  });
});
