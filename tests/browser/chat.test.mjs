// Browser test of swiftlet's web chat page, in headless Chromium.
//
// Runs against a live server (tools/scripts/browser-test.sh starts one with
// --dev-auth on free ports and runs this file):
//   SWIFTLET_PAGE_URL       the HTTP listener, e.g. http://127.0.0.1:7480
//   SWIFTLET_TCP        the TCP listener, e.g. 127.0.0.1:7400 (for the CLI user)
//   SWIFTLET_BIN_DIR    where swiftlet-cli is (default: the release target dir)
//   SWIFTLET_ARTIFACTS  where screenshots go (default target/browser-artifacts)
//   CHROMIUM            the browser (default /usr/bin/chromium)
//
// Two pages (separate browser contexts, so separate localStorage) log in as
// alice and bob and chat live; alice's message goes ✓ (bob offline) → ✓✓
// (bob back, caught up) → read (bob opens the conversation); typing shows on
// the other side; a TCP user (carol, the Rust CLI) messages alice and gets an
// answer; alice creates a group with bob and carol and everyone gets its
// messages; a reloaded page rebuilds its history by Sync. Every wait is
// bounded; a failure exits 1 with the step name, screenshots and the pages'
// console output.

import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { mkdirSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BASE = (process.env.SWIFTLET_PAGE_URL || 'http://127.0.0.1:7480').replace(/\/$/, '');
const TCP = process.env.SWIFTLET_TCP || '127.0.0.1:7400';
const TARGET = process.env.CARGO_TARGET_DIR || path.join(os.homedir(), '.cache', 'swiftlet', 'target');
const BIN_DIR = process.env.SWIFTLET_BIN_DIR || path.join(TARGET, 'release');
const ART = path.resolve(process.env.SWIFTLET_ARTIFACTS || path.join(ROOT, 'target', 'browser-artifacts'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = Number(process.env.SWIFTLET_WAIT_MS || 15000);
const RUN = Date.now().toString(36);   // makes this run's texts unique

mkdirSync(ART, { recursive: true });

let browser = null;
let cli = null;
const pages = {};          // name → page
const logs = [];           // console / page errors of every page
let step = 'start';
let shot = 0;

function log(msg) { console.log(`[browser-test] ${msg}`); }

async function screenshot(name) {
  for (const [who, page] of Object.entries(pages)) {
    if (page.isClosed() || page.url() === 'about:blank') continue;
    const file = path.join(ART, `${String(++shot).padStart(2, '0')}-${name}-${who}.png`);
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
  }
}

/** Run one named step; its failure names it. */
async function stepOf(name, fn) {
  step = name;
  log(`▶ ${name}`);
  const t0 = Date.now();
  await fn();
  log(`  ok (${Date.now() - t0} ms)`);
}

// ----------------------------------------------------------- page helpers

async function openPage(ctxName) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') logs.push(`${ctxName} console.${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => logs.push(`${ctxName} pageerror: ${e.message}`));
  page.setDefaultTimeout(WAIT);
  pages[ctxName] = page;
  return page;
}

async function login(page, user) {
  await page.goto(`${BASE}/`, { waitUntil: 'domcontentloaded' });
  await page.locator('#login-user').fill(user);
  await page.locator('#login-button').click();
  await page.locator('#conn-status[data-state="online"]').waitFor();
  await page.locator('#chat').waitFor({ state: 'visible' });
  const me = await page.locator('#me').textContent();
  if (!me.startsWith(user)) throw new Error(`logged in as "${me}", wanted ${user}`);
}

function mine(page, text) {
  return page.locator('.message.mine', { has: page.locator('.body', { hasText: text }) });
}

function theirs(page, text) {
  return page.locator('.message:not(.mine)', { has: page.locator('.body', { hasText: text }) });
}

async function waitStatus(page, text, status) {
  await page.locator(`.message.mine[data-status="${status}"]`, { has: page.locator('.body', { hasText: text }) })
    .waitFor({ timeout: WAIT })
    .catch(async (e) => {
      const now = await mine(page, text).getAttribute('data-status').catch(() => 'absent');
      throw new Error(`message "${text}" never reached status ${status} (it is ${now}): ${e.message.split('\n')[0]}`);
    });
}

/** Wait until a message of mine is stored (any of ✓, ✓✓, read). */
async function acked(page, text) {
  await page.locator('.message.mine:is([data-status="sent"], [data-status="delivered"], [data-status="read"])',
    { has: page.locator('.body', { hasText: text }) }).waitFor()
    .catch((e) => { throw new Error(`message "${text}" never got its Ack: ${e.message.split('\n')[0]}`); });
}

/** Record each status a message of mine shows, in order, from now on. */
async function recordStatuses(page, text) {
  await page.evaluate((t) => {
    window.__statusLog = window.__statusLog || {};
    const log = (window.__statusLog[t] = []);
    const look = () => {
      for (const m of document.querySelectorAll('.message.mine')) {
        if (m.querySelector('.body')?.textContent !== t) continue;
        const s = m.dataset.status;
        if (s && log[log.length - 1] !== s) log.push(s);
      }
    };
    new MutationObserver(look).observe(document.body, {
      subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ['data-status'],
    });
  }, text);
}

async function statusesOf(page, text) {
  return page.evaluate((t) => window.__statusLog[t], text);
}

async function openConv(page, key) {
  await page.locator(`[data-testid="conv-${key}"]`).click();
  await page.locator('#conv-title').waitFor();
}

async function typeAndSend(page, text) {
  await page.locator('#message-input').fill(text);
  await page.locator('#send-button').click();
}

function assert(cond, msg) { if (!cond) throw new Error(msg); }

// --------------------------------------------------------------- the CLI

function startCli(user) {
  const bin = path.join(BIN_DIR, 'swiftlet-cli');
  if (!existsSync(bin)) throw new Error(`${bin} not found: build it (cargo build --release) or set SWIFTLET_BIN_DIR`);
  const child = spawn(bin, ['--server', TCP, '--dev-auth', '--user', user, '--device', `cli-${RUN}`], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const state = { out: '', child, waiters: [] };
  const feed = (chunk) => {
    state.out += chunk.toString();
    state.waiters = state.waiters.filter((w) => {
      if (w.re.test(state.out.slice(w.from))) { clearTimeout(w.timer); w.resolve(); return false; }
      return true;
    });
  };
  child.stdout.on('data', feed);
  child.stderr.on('data', (c) => { logs.push(`cli stderr: ${c.toString().trimEnd()}`); });
  child.on('exit', (code) => logs.push(`cli exited with ${code}`));
  state.mark = () => state.out.length;
  state.waitFor = (re, from = 0, what = String(re)) => new Promise((resolve, reject) => {
    if (re.test(state.out.slice(from))) { resolve(); return; }
    const w = { re, from, resolve };
    w.timer = setTimeout(() => {
      state.waiters = state.waiters.filter((x) => x !== w);
      reject(new Error(`the CLI did not print ${what} within ${WAIT} ms; its output:\n${state.out}`));
    }, WAIT);
    state.waiters.push(w);
  });
  state.line = (l) => child.stdin.write(`${l}\n`);
  return state;
}

// ------------------------------------------------------------------ test

async function main() {
  log(`server ${BASE} (tcp ${TCP}); screenshots in ${ART}`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
      '--no-first-run', '--disable-component-update', '--disable-sync',
    ],
  });
  const alice = await openPage('alice');
  const bob = await openPage('bob');

  await stepOf('the page loads and both users log in', async () => {
    await alice.goto(`${BASE}/`, { waitUntil: 'domcontentloaded' });
    await alice.locator('#login-user').waitFor();
    await screenshot('login');
    await login(alice, 'alice');
    await login(bob, 'bob');
    await screenshot('logged-in');
  });

  const hello = `hello bob ${RUN}`;
  await stepOf('alice opens a chat with bob and sends; bob sees it live', async () => {
    await alice.locator('#peer-input').fill('bob');
    await alice.locator('#open-chat').click();
    await alice.locator('#conv-title', { hasText: 'bob' }).waitFor();
    await typeAndSend(alice, hello);
    await mine(alice, hello).waitFor();
    // Bob has not opened the conversation: it shows in his list, unread.
    const conv = bob.locator('[data-testid="conv-u:alice"]');
    await conv.locator('.preview', { hasText: hello }).waitFor();
    await conv.locator('.unread', { hasText: '1' }).waitFor();
    await waitStatus(alice, hello, 'delivered');
    await screenshot('bob-sees-it-live');
  });

  const away = `are you there ${RUN}`;
  await stepOf('✓ while bob is offline, ✓✓ once he is back, read once he opens it', async () => {
    await bob.evaluate(() => window.swiftletApp.client.drop(120000));
    await bob.locator('#conn-status[data-state="offline"]').waitFor();
    await recordStatuses(alice, away);
    await typeAndSend(alice, away);
    await waitStatus(alice, away, 'sent');          // ✓: stored, bob has nothing yet
    assert((await mine(alice, away).locator('.status').textContent()) === '✓', 'a stored message should show ✓');
    await screenshot('sent-while-bob-offline');
    await bob.evaluate(() => window.swiftletApp.client.resume());
    await bob.locator('#conn-status[data-state="online"]').waitFor();
    // Bob's page caught up by itself (delivery resumes after his cursor).
    await bob.locator('[data-testid="conv-u:alice"] .preview', { hasText: away }).waitFor();
    await bob.locator('[data-testid="conv-u:alice"] .unread', { hasText: '2' }).waitFor();
    await waitStatus(alice, away, 'delivered');     // ✓✓
    assert((await mine(alice, away).locator('.status').textContent()) === '✓✓', 'a delivered message should show ✓✓');
    await screenshot('delivered-after-bob-reconnects');
    await openConv(bob, 'u:alice');
    await theirs(bob, hello).waitFor();
    await theirs(bob, away).waitFor();
    await waitStatus(alice, away, 'read');
    await waitStatus(alice, hello, 'read');
    assert(/read/.test(await mine(alice, away).locator('.status').textContent()), 'a read message should say read');
    const seen = (await statusesOf(alice, away)).filter((s) => s !== 'sending');
    assert(JSON.stringify(seen) === JSON.stringify(['sent', 'delivered', 'read']),
      `alice's message went through ${JSON.stringify(seen)}, wanted sent → delivered → read`);
    await screenshot('read-by-bob');
  });

  const reply = `hi alice, bob here ${RUN}`;
  await stepOf('bob types (alice sees "bob is typing…"), then replies', async () => {
    await bob.locator('#message-input').pressSequentially('hi alice', { delay: 40 });
    await alice.locator('#typing-indicator', { hasText: 'bob is typing…' }).waitFor();
    await screenshot('bob-is-typing');
    await bob.locator('#message-input').fill(reply);
    await bob.locator('#send-button').click();
    await theirs(alice, reply).waitFor();
    // STOPPED on send (or the message itself) clears the indicator.
    await alice.waitForFunction(() => document.querySelector('#typing-indicator').textContent === '', null, { timeout: WAIT });
    // Alice has the conversation open, so her page marks it read.
    await waitStatus(bob, reply, 'read');
    await screenshot('bob-replied');
  });

  let gsendSupported = false;
  const fromTcp = `hi from tcp ${RUN}`;
  await stepOf('a TCP user (carol, swiftlet-cli) messages alice; alice answers', async () => {
    cli = startCli('carol');
    await cli.waitFor(/connected to/, 0, '"connected to"');
    let from = cli.mark();
    cli.line('/help');
    await cli.waitFor(/\/quit/, from, 'its /help');
    gsendSupported = /\/gsend|\/group send/.test(cli.out.slice(from));
    from = cli.mark();
    cli.line(`/send alice ${fromTcp}`);
    await cli.waitFor(/✓ alice \(#\d+\)/, from, 'the ✓ (Ack) of its send');
    const conv = alice.locator('[data-testid="conv-u:carol"]');
    await conv.locator('.preview', { hasText: fromTcp }).waitFor();
    await conv.click();
    await theirs(alice, fromTcp).waitFor();
    const answer = `welcome carol ${RUN}`;
    from = cli.mark();
    await typeAndSend(alice, answer);
    await cli.waitFor(new RegExp(`alice: ${answer}`), from, `alice's answer "${answer}"`);
    await waitStatus(alice, answer, 'delivered');   // the CLI acknowledges what it prints
    await screenshot('tcp-user-joins');
  });

  const groupName = `team-${RUN}`;
  const posted = `hello team ${RUN}`;
  await stepOf('alice creates a group with bob and carol and posts; bob and carol get it', async () => {
    await alice.locator('#new-group summary').click();
    await alice.locator('#group-name').fill(groupName);
    await alice.locator('#group-members').fill('bob, carol');
    await alice.locator('#create-group').click();
    await alice.locator('#conv-title', { hasText: groupName }).waitFor();
    await alice.locator('#conv-subtitle', { hasText: 'carol' }).waitFor();
    const key = await alice.evaluate(() => window.swiftletApp.openKey);
    assert(key.startsWith('g:'), `the new group's conversation key is ${key}`);
    const from = cli.mark();
    await typeAndSend(alice, posted);
    await acked(alice, posted);
    const conv = bob.locator(`[data-testid="conv-${key}"]`);
    await conv.locator('.name', { hasText: groupName }).waitFor();
    await conv.click();
    await theirs(bob, posted).waitFor();
    await cli.waitFor(new RegExp(posted), from, `the group message "${posted}"`);
    // Bob and carol's CLI both acknowledged it: ✓✓ at least (read needs carol to read).
    await waitStatus(alice, posted, 'delivered');
    if (gsendSupported) {
      const gid = key.slice(2);
      const fromCarol = `carol in the group ${RUN}`;
      cli.line(`/gsend ${gid} ${fromCarol}`);
      await theirs(bob, fromCarol).waitFor();
      await theirs(alice, fromCarol).waitFor();
    } else {
      log('  (this swiftlet-cli has no /gsend: carol only receives in the group)');
    }
    await screenshot('group');
  });

  await stepOf('a reloaded page rebuilds its history by Sync and stays live', async () => {
    await bob.reload({ waitUntil: 'domcontentloaded' });
    await bob.locator('#conn-status[data-state="online"]').waitFor();
    await bob.locator('[data-testid="conv-u:alice"]').click();
    await theirs(bob, hello).waitFor();
    await mine(bob, reply).waitFor();
    const last = `after the reload ${RUN}`;
    await alice.locator('[data-testid="conv-u:bob"]').click();
    await typeAndSend(alice, last);
    await theirs(bob, last).waitFor();
    await waitStatus(alice, last, 'read');
    await screenshot('after-reload');
  });
}

async function cleanup() {
  if (cli) {
    try { cli.child.stdin.end('/quit\n'); } catch (_) { /* gone */ }
    setTimeout(() => { try { cli.child.kill('SIGKILL'); } catch (_) { /* gone */ } }, 2000).unref();
  }
  if (browser) await browser.close().catch(() => {});
}

const deadline = setTimeout(() => {
  console.error(`[browser-test] FAILED: the whole test took over 5 minutes (step: ${step})`);
  process.exit(1);
}, 5 * 60 * 1000);
deadline.unref();

try {
  await main();
  await cleanup();
  log(`PASSED; screenshots in ${ART}`);
  process.exit(0);
} catch (e) {
  console.error(`[browser-test] FAILED in step "${step}": ${e && e.stack ? e.stack : e}`);
  await screenshot(`failure`).catch(() => {});
  if (logs.length) console.error(`[browser-test] page and CLI logs:\n  ${logs.join('\n  ')}`);
  await cleanup();
  process.exit(1);
}
