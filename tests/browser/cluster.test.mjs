// Browser test of the web page in a cluster, in headless Chromium.
//
// Runs against two live cluster nodes joined through a redis-server
// (tools/scripts/browser-test.sh starts them after chat.test.mjs):
//   SWIFTLET_PAGE_URL     node 1's HTTP listener: both pages are loaded from it
//   SWIFTLET_LOCAL_USER   a user whose home is node 1
//   SWIFTLET_REMOTE_USER  a user whose home is node 2 (node 2 allows node 1's origin)
//   CHROMIUM              the browser (default /usr/bin/chromium)
//
//   SWIFTLET_REDIS, SWIFTLET_REMOTE_PARTITION, SWIFTLET_BIN_DIR,
//   SWIFTLET_NODE2_PID    to move the remote user's partition away from node 2
//
// The remote user's login at node 1 gets NOT_HOME; the page must open its
// WebSocket at node 2 (redirect.http_addr), log in again and say so in its
// status; then the two users chat both ways across the nodes. Then node 2
// is paused (SIGSTOP) until its lease lapses, the remote user's partition
// is moved to node 1 (`cluster move-partition --force`, which waits for the
// lapse), and node 2 resumes: it ends the page's session with NOT_HOME
// naming node 1, and the page must follow it there and keep chatting. Every wait is bounded; a
// failure exits 1 with the step name and the pages' console.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import path from 'node:path';

const BASE = (process.env.SWIFTLET_PAGE_URL || 'http://127.0.0.1:7480').replace(/\/$/, '');
const LOCAL = process.env.SWIFTLET_LOCAL_USER;
const REMOTE = process.env.SWIFTLET_REMOTE_USER;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const REDIS = process.env.SWIFTLET_REDIS;
const PARTITION = process.env.SWIFTLET_REMOTE_PARTITION;
const BIN_DIR = process.env.SWIFTLET_BIN_DIR;
const NODE2_PID = Number(process.env.SWIFTLET_NODE2_PID || 0);
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

  await stepOf(`${REMOTE}'s partition moves to node 1 under the open page: it follows`, async () => {
    if (!REDIS || !PARTITION || !BIN_DIR || !NODE2_PID) {
      throw new Error('SWIFTLET_REDIS, SWIFTLET_REMOTE_PARTITION, SWIFTLET_BIN_DIR and SWIFTLET_NODE2_PID are required');
    }
    const move = ['cluster', '--redis', REDIS, 'move-partition', PARTITION, '--to', '1', '--force'];
    process.kill(NODE2_PID, 'SIGSTOP');
    try {
      // A forced move is refused while the old home holds its lease.
      const until = Date.now() + WAIT;
      for (;;) {
        try {
          execFileSync(path.join(BIN_DIR, 'swiftlet'), move, { stdio: 'pipe' });
          break;
        } catch (e) {
          if (Date.now() > until) throw new Error(`move-partition kept failing: ${e.stderr}`);
          await new Promise((r) => setTimeout(r, 200));
        }
      }
    } finally {
      process.kill(NODE2_PID, 'SIGCONT');
    }
    // Node 2 names node 1; node 1 may not have read the new map yet and
    // answer HOME_UNAVAILABLE, after which the page retries through its
    // first URL, node 1 too. Either way it ends up online at node 1.
    const node1 = new URL(BASE).host;
    await remote.waitForFunction((host) => {
      const c = window.swiftletApp.client;
      return c.online && new URL(c.url).host === host;
    }, node1, { timeout: WAIT }).catch(async (e) => {
      const st = await remote.evaluate(() => {
        const c = window.swiftletApp.client;
        return `state ${c.state}, url ${c.url}, last error ${c.lastError && c.lastError.message}`;
      });
      throw new Error(`the page did not follow the move to node 1 (${st}): ${e.message.split('\n')[0]}`);
    });
    const moved = `after the move ${RUN}`;
    await say(local, REMOTE, moved);
    await arrived(remote, LOCAL, moved);
    const back = `from node 1 ${RUN}`;
    await say(remote, LOCAL, back);
    await arrived(local, REMOTE, back);
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
