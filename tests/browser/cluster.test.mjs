// Browser test of the web page in a cluster, in headless Chromium.
//
// Runs against two live cluster nodes joined through a redis-server
// (tools/scripts/browser-test.sh starts them after chat.test.mjs):
//   SWIFTLET_PAGE_URL     node 1's HTTP listener: both pages are loaded from it
//   SWIFTLET_LOCAL_USER   a user whose home is node 1
//   SWIFTLET_REMOTE_USER  a user whose home is node 2 (node 2 allows node 1's origin)
//   CHROMIUM              the browser (default /usr/bin/chromium)
//
// The remote user's login at node 1 gets NOT_HOME; the page must open its
// WebSocket at node 2 (redirect.http_addr), log in again and say so in its
// status; then the two users chat both ways across the nodes. Every wait is
// bounded; a failure exits 1 with the step name and the pages' console.

import { chromium } from 'playwright-core';

const BASE = (process.env.SWIFTLET_PAGE_URL || 'http://127.0.0.1:7480').replace(/\/$/, '');
const LOCAL = process.env.SWIFTLET_LOCAL_USER;
const REMOTE = process.env.SWIFTLET_REMOTE_USER;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = Number(process.env.SWIFTLET_WAIT_MS || 20000);
const RUN = Date.now().toString(36);

let browser = null;
let step = 'start';
const logs = [];

function log(msg) { console.log(`[browser-test:cluster] ${msg}`); }

async function stepOf(name, fn) {
  step = name;
  log(`▶ ${name}`);
  const t0 = Date.now();
  await fn();
  log(`  ok (${Date.now() - t0} ms)`);
}

async function openPage(name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('console', (m) => logs.push(`${name} console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`${name} pageerror: ${e.message}`));
  page.setDefaultTimeout(WAIT);
  return page;
}

// A login may meet HOME_UNAVAILABLE while the nodes read the new map: the
// page retries by itself, so waiting for "online" covers that too.
async function login(page, user) {
  await page.goto(`${BASE}/`, { waitUntil: 'domcontentloaded' });
  await page.locator('#login-user').fill(user);
  await page.locator('#login-button').click();
  await page.locator('#conn-status[data-state="online"]').waitFor();
  await page.locator('#chat').waitFor({ state: 'visible' });
}

/** Wait until `text` from `peer` shows in the page's conversation list. */
async function arrived(page, peer, text) {
  await page.locator(`[data-testid="conv-u:${peer}"] .preview`, { hasText: text }).waitFor();
}

async function say(page, peer, text) {
  await page.locator('#peer-input').fill(peer);
  await page.locator('#open-chat').click();
  await page.locator('#message-input').fill(text);
  await page.locator('#send-button').click();
}

async function main() {
  if (!LOCAL || !REMOTE) throw new Error('SWIFTLET_LOCAL_USER and SWIFTLET_REMOTE_USER are required');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
  });
  const remote = await openPage(REMOTE);
  const local = await openPage(LOCAL);

  await stepOf(`${REMOTE} logs in at node 1 and is redirected to node 2`, async () => {
    await login(remote, REMOTE);
    const status = await remote.locator('#conn-status').textContent();
    if (!/node 2/.test(status)) throw new Error(`status "${status}" does not name node 2`);
    const url = await remote.evaluate(() => window.swiftletApp.client.url);
    if (new URL(url).host === new URL(BASE).host) throw new Error(`the socket stayed at node 1: ${url}`);
  });

  await stepOf(`${LOCAL} logs in at node 1, its home (no redirect)`, async () => {
    await login(local, LOCAL);
    const status = await local.locator('#conn-status').textContent();
    if (status !== 'online') throw new Error(`status "${status}": expected a plain "online"`);
  });

  await stepOf('the two chat across the nodes, both ways', async () => {
    const hello = `across the cluster ${RUN}`;
    await say(local, REMOTE, hello);
    await arrived(remote, LOCAL, hello);
    const reply = `and back ${RUN}`;
    await say(remote, LOCAL, reply);
    await arrived(local, REMOTE, reply);
  });
}

const deadline = setTimeout(() => {
  console.error(`[browser-test:cluster] FAILED: over 3 minutes (step: ${step})`);
  process.exit(1);
}, 3 * 60 * 1000);
deadline.unref();

try {
  await main();
  await browser.close().catch(() => {});
  log('PASSED');
  process.exit(0);
} catch (e) {
  console.error(`[browser-test:cluster] FAILED in step "${step}": ${e && e.stack ? e.stack : e}`);
  if (logs.length) console.error(`[browser-test:cluster] page logs:\n  ${logs.join('\n  ')}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}
