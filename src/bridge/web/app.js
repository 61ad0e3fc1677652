// swiftlet web chat page: the UI over client.js.
//
// State lives in plain objects (one per conversation) and is drawn into the
// DOM with stable elements keyed by message, so a status tick (✓ → ✓✓ →
// read) updates one span in place. Everything the page shows comes from the
// user's inbox: history by Sync on the first login of the tab, then live
// Delivers (the server resumes after this device's cursor, which is also how
// a reconnect catches up). Receipts arrive as inbox events of the sender and
// cover every message of the conversation up to a message id; ids are
// compared as BigInt because they exceed 2^53.

import {
  SwiftletClient, loadSchema, u64, u64s, bodyText, conversationKey, defaultSocketUrl,
} from './client.js';

const ID_RE = /^[A-Za-z0-9._@-]{1,64}$/;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_DEFAULT_TTL_MS = 6000;

const $ = (sel) => document.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const S = {
  client: null,
  me: null,
  deviceId: null,
  convs: new Map(),        // 'u:bob' | 'g:123' → conversation
  openKey: null,
  presence: new Map(),     // user → {online, lastSeenMs}
  historyLoaded: false,
  typingSent: { key: null, at: 0 },
  presenceTimer: null,
};
window.swiftletApp = S;   // for debugging and the browser test

// ------------------------------------------------------------ conversations

function getConv(key) {
  let c = S.convs.get(key);
  if (!c) {
    const isGroup = key.startsWith('g:');
    c = {
      key,
      kind: isGroup ? 'group' : 'user',
      peer: isGroup ? null : key.slice(2),
      groupId: isGroup ? key.slice(2) : null,
      name: isGroup ? `group #${key.slice(2)}` : key.slice(2),
      members: null,         // group: array of user ids once known
      messages: new Map(),   // item key → item (message or notice)
      byId: new Map(),       // message id → item
      delivered: new Map(),  // user → BigInt watermark (DELIVERED receipts)
      read: new Map(),       // user → BigInt watermark (READ receipts)
      myRead: 0n,            // how far I read (my READ receipts, any device)
      markedUpTo: 0n,        // MarkRead sent up to here
      typing: new Map(),     // user → timer
      lastAt: 0,
      left: false,
    };
    S.convs.set(key, c);
    if (!isGroup) schedulePresence();
  }
  return c;
}

function messageKeyOf(m) {
  if (u64(m.groupId) !== 0n) return `g:${u64s(m.groupId)}`;
  return `u:${m.fromUser === S.me ? m.toUser : m.fromUser}`;
}

function sortKey(item) {
  return [BigInt(item.ts || 0), item.id ? u64(item.id) : BigInt(Number.MAX_SAFE_INTEGER) + BigInt(item.order || 0)];
}

function sortedItems(c) {
  return [...c.messages.values()].sort((a, b) => {
    const [ta, ia] = sortKey(a);
    const [tb, ib] = sortKey(b);
    if (ta !== tb) return ta < tb ? -1 : 1;
    if (ia !== ib) return ia < ib ? -1 : 1;
    return 0;
  });
}

let orderCounter = 0;

/** Add or update a chat message (from the inbox, or a local send). */
function upsertMessage({ id, clientMsgId, from, fromDevice, text, ts, groupId, conv }) {
  const c = getConv(conv);
  let item = (id && c.byId.get(id)) || null;
  const mine = from === S.me;
  if (!item && mine && clientMsgId) item = c.messages.get(`c:${clientMsgId}`) || null;
  if (!item) {
    item = {
      type: 'message', key: id ? `m:${id}` : `c:${clientMsgId}`, id: null, clientMsgId,
      from, fromDevice, text, ts, mine, failed: false, order: ++orderCounter, groupId,
    };
    c.messages.set(item.key, item);
  }
  if (id && !item.id) {
    item.id = id;
    c.byId.set(id, item);
  }
  if (ts) item.ts = ts;
  if (text !== undefined) item.text = text;
  c.lastAt = Math.max(c.lastAt, Number(item.ts) || Date.now());
  return { c, item };
}

function addNotice(convKey, seq, ts, text) {
  const c = getConv(convKey);
  const key = `e:${seq}`;
  if (!c.messages.has(key)) {
    c.messages.set(key, { type: 'notice', key, ts, text, order: ++orderCounter });
  }
  c.lastAt = Math.max(c.lastAt, Number(ts) || 0);
  return c;
}

/** Everyone in the conversation but me whose receipts matter for my messages. */
function others(c) {
  if (c.kind === 'user') return [c.peer];
  return (c.members || []).filter((u) => u !== S.me);
}

function covered(map, users, id) {
  const v = u64(id);
  if (users.length === 0) {
    // Group members not known yet: any receipt covering it counts.
    for (const w of map.values()) if (w >= v) return true;
    return false;
  }
  return users.every((u) => (map.get(u) || 0n) >= v);
}

function statusOf(c, item) {
  if (item.failed) return 'failed';
  if (!item.id) return 'sending';
  const who = others(c);
  if (c.kind === 'user' && c.peer === S.me) return 'read';  // notes to self
  if (covered(c.read, who, item.id)) return 'read';
  const delivered = new Map(c.delivered);
  for (const [u, w] of c.read) if ((delivered.get(u) || 0n) < w) delivered.set(u, w);
  if (covered(delivered, who, item.id)) return 'delivered';
  return 'sent';
}

const STATUS_TEXT = { sending: '🕓', sent: '✓', delivered: '✓✓', read: '✓✓ read', failed: '✗ not sent' };

function unreadCount(c) {
  let n = 0;
  for (const item of c.messages.values()) {
    if (item.type === 'message' && !item.mine && item.id && u64(item.id) > c.myRead) n += 1;
  }
  return n;
}

function newestFromOthers(c) {
  let best = 0n;
  for (const item of c.messages.values()) {
    if (item.type === 'message' && !item.mine && item.id) {
      const v = u64(item.id);
      if (v > best) best = v;
    }
  }
  return best;
}

// ----------------------------------------------------------- inbox events

function onInboxEvent(ev) {
  switch (ev.kind) {
    case 'message': onMessage(ev.message); break;
    // A notice is keyed by its seq, which names one event only within an
    // inbox epoch (see client.js).
    case 'groupEvent': onGroupEvent(ev.groupEvent, `${S.client.welcome.inboxEpoch}:${u64s(ev.seq)}`); break;
    case 'receipt': onReceipt(ev.receipt); break;
    default: break;   // a kind this page does not know
  }
}

function onMessage(m) {
  const key = messageKeyOf(m);
  const { c, item } = upsertMessage({
    id: u64s(m.id),
    clientMsgId: m.clientMsgId,
    from: m.fromUser,
    fromDevice: m.fromDevice,
    text: bodyText(m),
    ts: u64s(m.timestampMs),
    groupId: u64s(m.groupId),
    conv: key,
  });
  if (!item.mine) clearTyping(c, item.from);
  scheduleRender();
  if (key === S.openKey) scheduleMarkRead();
}

// A change concerning more than 64 users lists at most the reader.
function whom(e) {
  const users = e.users || [];
  const unlisted = (e.userCount || 0) - users.length;
  if (unlisted <= 0) return users.join(', ');
  return users.length ? `${users.join(', ')} and ${unlisted} others` : `${e.userCount} users`;
}

const GROUP_VERBS = {
  GROUP_EVENT_KIND_CREATED: (e) => `${e.actor} created the group “${e.name}”`,
  GROUP_EVENT_KIND_MEMBERS_ADDED: (e) => `${e.actor} added ${whom(e)}`,
  GROUP_EVENT_KIND_MEMBERS_REMOVED: (e) => `${e.actor} removed ${whom(e)}`,
  GROUP_EVENT_KIND_MEMBER_LEFT: (e) => `${(e.users.length ? e.users : [e.actor]).join(', ')} left`,
  GROUP_EVENT_KIND_RENAMED: (e) => `${e.actor} renamed the group to “${e.name}”`,
};

function onGroupEvent(g, seq) {
  const key = `g:${u64s(g.groupId)}`;
  const kind = S.client.schema.GroupEventKind.valuesById[g.kind] || 'GROUP_EVENT_KIND_UNSPECIFIED';
  const c = addNotice(key, seq, u64s(g.timestampMs), (GROUP_VERBS[kind] || (() => `group changed (${kind})`))(g));
  if (g.name) c.name = g.name;
  const users = g.users || [];
  const members = new Set(c.members || []);
  if (kind === 'GROUP_EVENT_KIND_CREATED') { members.add(g.actor); users.forEach((u) => members.add(u)); }
  if (kind === 'GROUP_EVENT_KIND_MEMBERS_ADDED') users.forEach((u) => members.add(u));
  if (kind === 'GROUP_EVENT_KIND_MEMBERS_REMOVED' || kind === 'GROUP_EVENT_KIND_MEMBER_LEFT') {
    (users.length ? users : [g.actor]).forEach((u) => members.delete(u));
  }
  if (c.members || kind === 'GROUP_EVENT_KIND_CREATED') c.members = [...members];
  c.left = c.members ? !c.members.includes(S.me) : c.left;
  if (!c.left && kind !== 'GROUP_EVENT_KIND_RENAMED') refreshGroup(c);
  scheduleRender();
}

function onReceipt(r) {
  const key = conversationKey(r.conversation);
  if (!key || key === 'u:') return;
  const c = getConv(key);
  const upTo = u64(r.upTo);
  const kind = S.client.schema.ReceiptKind.valuesById[r.kind];
  if (r.user === S.me) {
    // My own READ (this or another device of mine): nothing unread up to here.
    if (kind === 'RECEIPT_KIND_READ' && upTo > c.myRead) c.myRead = upTo;
  } else {
    const map = kind === 'RECEIPT_KIND_READ' ? c.read : c.delivered;
    if ((map.get(r.user) || 0n) < upTo) map.set(r.user, upTo);
  }
  scheduleRender();
}

async function refreshGroup(c) {
  if (!S.client || !S.client.online) return;
  try {
    const info = await S.client.getGroup(c.groupId);
    c.name = info.name || c.name;
    c.members = (info.members || []).map((m) => m.user);
    c.left = !c.members.includes(S.me);
    scheduleRender();
  } catch (e) {
    if (e.codeName === 'FORBIDDEN' || e.codeName === 'NOT_FOUND') { c.left = true; scheduleRender(); }
  }
}

async function refreshGroupList() {
  try {
    const groups = await S.client.listGroups();
    for (const g of groups) {
      const c = getConv(`g:${u64s(g.groupId)}`);
      if (g.name) c.name = g.name;
      c.left = false;
      if (!c.lastAt) c.lastAt = Number(u64(g.createdMs));
    }
    scheduleRender();
  } catch (e) {
    console.warn('ListGroups failed', e);
  }
}

// ----------------------------------------------------------------- typing

function setTyping(c, user, ttlMs) {
  clearTimeout(c.typing.get(user));
  c.typing.set(user, setTimeout(() => clearTyping(c, user), ttlMs));
  scheduleRender();
}

function clearTyping(c, user) {
  if (!c.typing.has(user)) return;
  clearTimeout(c.typing.get(user));
  c.typing.delete(user);
  scheduleRender();
}

function onTypingNotice(n) {
  if (n.user === S.me) return;
  const key = conversationKey(n.conversation);
  if (!key || key === 'u:') return;
  const c = getConv(key);
  const state = S.client.schema.TypingState.valuesById[n.state];
  if (state === 'TYPING_STATE_STARTED') setTyping(c, n.user, n.expiresInMs || TYPING_DEFAULT_TTL_MS);
  else clearTyping(c, n.user);
}

function typingText(c) {
  const users = [...c.typing.keys()];
  if (users.length === 0) return '';
  if (users.length === 1) return `${users[0]} is typing…`;
  return `${users.slice(0, -1).join(', ')} and ${users[users.length - 1]} are typing…`;
}

function target(c) { return c.kind === 'group' ? `#${c.groupId}` : c.peer; }

function onComposerInput() {
  const c = S.convs.get(S.openKey);
  if (!c || !S.client.online) return;
  const text = $('#message-input').value;
  const now = Date.now();
  if (text.trim() === '') { stopTyping(); return; }
  if (S.typingSent.key !== c.key || now - S.typingSent.at >= TYPING_SEND_EVERY_MS) {
    try {
      S.client.typing(target(c), true);
      S.typingSent = { key: c.key, at: now };
    } catch (_) { /* offline: nothing to tell */ }
  }
}

function stopTyping() {
  const { key, at } = S.typingSent;
  if (!key) return;
  S.typingSent = { key: null, at: 0 };
  const c = S.convs.get(key);
  if (!c || Date.now() - at > TYPING_DEFAULT_TTL_MS + 1000) return;   // lapsed by itself
  try { S.client.typing(target(c), false); } catch (_) { /* offline */ }
}

// ----------------------------------------------------------------- reading

let markTimer = null;
function scheduleMarkRead() {
  clearTimeout(markTimer);
  markTimer = setTimeout(markOpenRead, 50);
}

async function markOpenRead() {
  const c = S.convs.get(S.openKey);
  if (!c || !S.client || !S.client.online || document.visibilityState === 'hidden') return;
  const newest = newestFromOthers(c);
  if (newest === 0n || newest <= c.myRead || newest <= c.markedUpTo) return;
  c.markedUpTo = newest;
  try {
    await S.client.markRead(target(c), newest.toString());
    if (newest > c.myRead) c.myRead = newest;
    scheduleRender();
  } catch (e) {
    c.markedUpTo = 0n;    // try again on the next message or reconnect
    console.warn('MarkRead failed', e);
  }
}

// --------------------------------------------------------------- presence

function schedulePresence() {
  clearTimeout(S.presenceTimer);
  S.presenceTimer = setTimeout(subscribePresence, 100);
}

async function subscribePresence() {
  if (!S.client || !S.client.online) return;
  const users = [...S.convs.values()].filter((c) => c.kind === 'user' && c.peer !== S.me).map((c) => c.peer).slice(0, 1000);
  if (users.length === 0) return;
  try {
    for (const p of await S.client.subscribePresence(users)) onPresence(p);
  } catch (e) {
    console.warn('SubscribePresence failed', e);
  }
}

function onPresence(p) {
  S.presence.set(p.user, { online: p.online, lastSeenMs: Number(u64(p.lastSeenMs)) });
  scheduleRender();
}

// ----------------------------------------------------------------- drawing

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
  // rAF does not run in a background tab; make sure state still lands.
  setTimeout(() => { if (renderQueued) { renderQueued = false; render(); } }, 200);
}

function clock(ms) {
  const d = new Date(Number(ms));
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function lastSeenText(user) {
  const p = S.presence.get(user);
  if (!p) return '';
  if (p.online) return 'online';
  if (p.lastSeenMs) return `last seen ${new Date(p.lastSeenMs).toLocaleString([], { dateStyle: 'short', timeStyle: 'short' })}`;
  return '';
}

function render() {
  renderConversations();
  renderPane();
}

function renderConversations() {
  const list = $('#conversations');
  const convs = [...S.convs.values()].sort((a, b) => (b.lastAt - a.lastAt) || a.key.localeCompare(b.key));
  const existing = new Map([...list.children].map((li) => [li.dataset.key, li]));
  convs.forEach((c, i) => {
    let li = existing.get(c.key);
    if (!li) {
      li = el('li', 'conv');
      li.dataset.key = c.key;
      li.dataset.testid = `conv-${c.key}`;
      li.setAttribute('data-testid', `conv-${c.key}`);
      li.append(el('span', 'avatar'), el('div', 'meta'), el('span', 'unread'));
      li.querySelector('.meta').append(el('div', 'name'), el('div', 'preview'));
      li.addEventListener('click', () => openConversation(c.key));
    }
    existing.delete(c.key);
    li.classList.toggle('active', c.key === S.openKey);
    const av = li.querySelector('.avatar');
    av.textContent = (c.kind === 'group' ? c.name : c.peer).slice(0, 1).toUpperCase();
    av.classList.toggle('group', c.kind === 'group');
    av.classList.toggle('online', c.kind === 'user' && Boolean(S.presence.get(c.peer)?.online));
    li.querySelector('.name').textContent = c.kind === 'group' ? `${c.name}${c.left ? ' (left)' : ''}` : c.peer;
    const prev = li.querySelector('.preview');
    const typing = typingText(c);
    prev.classList.toggle('typing', Boolean(typing));
    if (typing) prev.textContent = typing;
    else {
      const last = sortedItems(c).filter((x) => x.type === 'message').pop();
      prev.textContent = last ? `${last.mine ? 'you: ' : c.kind === 'group' ? `${last.from}: ` : ''}${last.text}` : '';
    }
    const n = c.key === S.openKey ? 0 : unreadCount(c);
    const badge = li.querySelector('.unread');
    badge.textContent = n ? String(n) : '';
    badge.hidden = n === 0;
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
  });
  for (const li of existing.values()) li.remove();
}

function renderPane() {
  const c = S.convs.get(S.openKey);
  const box = $('#messages');
  const input = $('#message-input');
  const button = $('#send-button');
  if (!c) {
    $('#conv-title').textContent = 'No conversation open';
    $('#conv-subtitle').textContent = '';
    $('#typing-indicator').textContent = '';
    input.disabled = true;
    button.disabled = true;
    return;
  }
  $('#conv-title').textContent = c.kind === 'group' ? c.name : c.peer;
  $('#conv-subtitle').textContent = c.kind === 'group'
    ? (c.left ? 'you are not a member' : c.members ? c.members.join(', ') : '')
    : lastSeenText(c.peer);
  $('#typing-indicator').textContent = typingText(c);
  input.disabled = c.left;
  button.disabled = c.left;

  if (box.dataset.conv !== c.key) {
    box.replaceChildren();
    box.dataset.conv = c.key;
  }
  const items = sortedItems(c);
  const stuckToBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const existing = new Map([...box.children].map((n) => [n.dataset.key, n]));
  if (items.length === 0) {
    box.replaceChildren(el('p', 'empty', 'No messages yet. Say hi!'));
    return;
  }
  items.forEach((item, i) => {
    let node = existing.get(item.key);
    if (!node) node = item.type === 'notice' ? el('p', 'notice') : messageNode();
    existing.delete(item.key);
    node.dataset.key = item.key;
    if (item.type === 'notice') {
      node.textContent = item.text;
    } else {
      fillMessage(c, node, item);
    }
    if (box.children[i] !== node) box.insertBefore(node, box.children[i] || null);
  });
  for (const n of existing.values()) n.remove();
  if (stuckToBottom) box.scrollTop = box.scrollHeight;
}

function messageNode() {
  const n = el('div', 'message');
  n.setAttribute('data-testid', 'message');
  n.append(el('div', 'sender'), el('div', 'body'), el('div', 'info'));
  n.querySelector('.info').append(el('span', 'time'), el('span', 'status'));
  return n;
}

function fillMessage(c, node, item) {
  node.classList.toggle('mine', item.mine);
  node.dataset.id = item.id || '';
  node.dataset.clientMsgId = item.clientMsgId || '';
  node.dataset.from = item.from;
  const sender = node.querySelector('.sender');
  sender.textContent = !item.mine && c.kind === 'group' ? item.from : item.mine && item.fromDevice && item.fromDevice !== S.deviceId ? `you (${item.fromDevice})` : '';
  sender.hidden = sender.textContent === '';
  node.querySelector('.body').textContent = item.text;
  node.querySelector('.time').textContent = item.ts ? clock(item.ts) : '';
  const st = node.querySelector('.status');
  if (item.mine) {
    const s = statusOf(c, item);
    st.dataset.status = s;
    node.dataset.status = s;
    st.textContent = STATUS_TEXT[s];
    st.title = s;
  } else {
    st.textContent = '';
    delete st.dataset.status;
    delete node.dataset.status;
  }
}

function setConnStatus({ state, retryInMs, error }) {
  const s = $('#conn-status');
  s.dataset.state = state;
  let text = state;
  if (state === 'connecting') text = 'connecting…';
  const home = S.client && S.client.home;
  if (state === 'online' && home) text = `online · node ${home.nodeId}`;
  if (state === 'offline') text = retryInMs ? `offline, retrying in ${Math.ceil(retryInMs / 1000)} s` : 'offline';
  if (state === 'offline' && error && error.codeName === 'HOME_UNAVAILABLE') {
    text = `home node unavailable, retrying in ${Math.ceil((retryInMs || 0) / 1000)} s`;
  }
  if (state === 'stopped') text = `stopped: ${error ? error.codeName : 'refused'}`;
  s.textContent = text;
  s.title = error ? error.message : state;
}

// --------------------------------------------------------------- actions

function openConversation(key) {
  if (S.openKey && S.openKey !== key) stopTyping();
  S.openKey = key;
  const c = getConv(key);
  $('#message-input').value = '';
  if (c.kind === 'group' && !c.members) refreshGroup(c);
  render();
  const box = $('#messages');
  box.scrollTop = box.scrollHeight;
  $('#message-input').focus();
  scheduleMarkRead();
}

function sendCurrent() {
  const c = S.convs.get(S.openKey);
  const input = $('#message-input');
  const text = input.value.trim();
  if (!c || !text) return;
  input.value = '';
  stopTyping();
  const { clientMsgId, acked } = c.kind === 'group' ? S.client.sendGroup(c.groupId, text) : S.client.send(c.peer, text);
  upsertMessage({ id: null, clientMsgId, from: S.me, fromDevice: S.deviceId, text, ts: String(Date.now()), conv: c.key });
  acked.catch(() => {});
  render();
  $('#messages').scrollTop = $('#messages').scrollHeight;
}

function onAck({ clientMsgId, serverMsgId, timestampMs, entry }) {
  const key = u64(entry.groupId) !== 0n ? `g:${entry.groupId}` : `u:${entry.toUser}`;
  const c = getConv(key);
  const item = c.messages.get(`c:${clientMsgId}`) || c.byId.get(serverMsgId);
  if (item) {
    if (!item.id) { item.id = serverMsgId; c.byId.set(serverMsgId, item); }
    item.ts = timestampMs;
  } else {
    upsertMessage({ id: serverMsgId, clientMsgId, from: S.me, fromDevice: S.deviceId, text: entry.text, ts: timestampMs, conv: key });
  }
  if (c.kind === 'group') pollGroupReceipts(c, serverMsgId);
  scheduleRender();
}

// In groups the server keeps "delivered" as watermarks and does not push a
// receipt per member (see protocol/README.md, Receipts): the sender asks
// with GetReceipts. A few asks after a post, backing off, until every member
// has it.
function pollGroupReceipts(c, msgId, attempt = 0) {
  const delays = [300, 1000, 3000, 8000, 20000];
  if (attempt >= delays.length) return;
  setTimeout(async () => {
    if (!S.client || !S.client.online) return;
    try {
      const list = await S.client.getReceipts(c.groupId, msgId);
      const id = u64(msgId);
      for (const u of [...(list.delivered || []), ...(list.read || [])]) {
        if ((c.delivered.get(u) || 0n) < id) c.delivered.set(u, id);
      }
      for (const u of list.read || []) {
        if ((c.read.get(u) || 0n) < id) c.read.set(u, id);
      }
      scheduleRender();
      if ((list.pending || []).length > 0) pollGroupReceipts(c, msgId, attempt + 1);
    } catch (_) {
      pollGroupReceipts(c, msgId, attempt + 1);
    }
  }, delays[attempt]);
}

function onSendFailed({ clientMsgId, error, entry }) {
  const key = u64(entry.groupId) !== 0n ? `g:${entry.groupId}` : `u:${entry.toUser}`;
  const item = getConv(key).messages.get(`c:${clientMsgId}`);
  if (item) { item.failed = true; item.error = error.message; }
  scheduleRender();
}

async function createGroup() {
  const name = $('#group-name').value.trim();
  const members = $('#group-members').value.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean);
  const bad = members.find((m) => !ID_RE.test(m));
  if (!name) { alert('Give the group a name.'); return; }
  if (bad) { alert(`“${bad}” is not a valid user id.`); return; }
  try {
    const info = await S.client.createGroup(name, members.filter((m) => m !== S.me));
    const c = getConv(`g:${u64s(info.groupId)}`);
    c.name = info.name;
    c.members = (info.members || []).map((m) => m.user);
    c.left = false;
    c.lastAt = Math.max(c.lastAt, Date.now());
    $('#group-name').value = '';
    $('#group-members').value = '';
    $('#new-group').open = false;
    openConversation(c.key);
  } catch (e) {
    alert(`Could not create the group: ${e.message}`);
  }
}

// ------------------------------------------------------------------ login

/** A device id for this user in this browser, not used by another open tab. */
async function pickDeviceId(user) {
  for (let i = 0; i < 16; i += 1) {
    const storeKey = `swiftlet.device.${user}${i ? `.${i}` : ''}`;
    let id = localStorage.getItem(storeKey);
    if (!id) {
      const b = new Uint8Array(5);
      crypto.getRandomValues(b);
      id = `web-${Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')}`;
      localStorage.setItem(storeKey, id);
    }
    if (!navigator.locks) return id;
    // Two tabs must not log in as the same device at once: hold a lock on it
    // for the tab's lifetime; a second tab takes the next id.
    const got = await new Promise((resolve) => {
      navigator.locks.request(`swiftlet-device-${user}-${id}`, { ifAvailable: true }, (lock) => {
        resolve(Boolean(lock));
        return lock ? new Promise(() => {}) : undefined;
      });
    });
    if (got) return id;
  }
  return `web-${Date.now().toString(36)}`;
}

function userOfToken(token) {
  const parts = token.split('.');
  if (parts.length === 3) {
    try {
      const json = JSON.parse(atob(parts[1].replace(/-/g, '+').replace(/_/g, '/')));
      if (json.sub) return String(json.sub);
    } catch (_) { /* not a JWT after all */ }
  }
  return token;
}

async function login(token) {
  $('#login-error').textContent = '';
  const user = userOfToken(token);
  if (!ID_RE.test(user)) {
    $('#login-error').textContent = 'Not a valid user id (1-64 of A-Z a-z 0-9 . _ @ -) or JWT.';
    return;
  }
  $('#login-button').disabled = true;
  try {
    await loadSchema();
  } catch (e) {
    $('#login-error').textContent = `Cannot load the protocol: ${e.message}`;
    $('#login-button').disabled = false;
    return;
  }
  S.deviceId = await pickDeviceId(user);
  const client = new SwiftletClient({
    url: defaultSocketUrl(),
    token,
    deviceId: S.deviceId,
    outboxKey: `swiftlet.outbox.${user}.${S.deviceId}`,
  });
  S.client = client;
  client.addEventListener('state', (e) => {
    setConnStatus(e.detail);
    if (e.detail.state === 'offline' && !S.me) {
      $('#login-error').textContent = `Cannot reach the server (${e.detail.error ? e.detail.error.message : 'offline'}); retrying…`;
    }
    if (e.detail.state === 'stopped' && !S.me) {
      $('#login-error').textContent = `Login refused: ${e.detail.error ? e.detail.error.message : 'stopped'}`;
      $('#login-button').disabled = false;
      sessionStorage.removeItem('swiftlet.token');
      S.client = null;
    }
  });
  client.addEventListener('welcome', (e) => onWelcome(e.detail));
  client.addEventListener('event', (e) => onInboxEvent(e.detail.event));
  client.addEventListener('gap', (e) => onGap(e.detail));
  client.addEventListener('ack', (e) => onAck(e.detail));
  client.addEventListener('sendfailed', (e) => onSendFailed(e.detail));
  client.addEventListener('typing', (e) => onTypingNotice(e.detail.notice));
  client.addEventListener('presence', (e) => onPresence(e.detail.presence));
  client.addEventListener('error', (e) => console.warn('swiftlet:', e.detail.error.message));
  client.addEventListener('redirect', (e) => {
    // A cluster serves each user from their home node (client.home).
    console.info(`swiftlet: redirected to node ${e.detail.nodeId} at ${e.detail.httpAddr}`);
  });
  client.start();
  sessionStorage.setItem('swiftlet.token', token);
}

async function onWelcome({ welcome, first }) {
  if (first || !S.me) {
    S.me = welcome.userId;
    $('#me').textContent = `${welcome.userId} · ${welcome.deviceId}`;
    $('#login').hidden = true;
    $('#chat').hidden = false;
    $('#logout-button').hidden = false;
    $('#login-button').disabled = false;
    $('#login-error').textContent = '';
    // Pending sends from before a reload: show them until their Ack.
    for (const e of S.client.pendingSends()) {
      upsertMessage({
        id: null, clientMsgId: e.clientMsgId, from: S.me, fromDevice: S.deviceId, text: e.text,
        ts: String(e.createdMs), conv: u64(e.groupId) !== 0n ? `g:${e.groupId}` : `u:${e.toUser}`,
      });
    }
    render();
  }
  if (!S.historyLoaded) {
    // History up to the cursor; everything after it arrives as Delivers.
    try {
      // A gap it finds comes as a 'gap' event (onGap).
      await S.client.syncRange(0n, welcome.cursor);
      S.historyLoaded = true;
    } catch (e) {
      console.warn('history sync failed; will retry on the next login', e);
    }
  }
  await refreshGroupList();
  subscribePresence();
  scheduleMarkRead();
  scheduleRender();
}

/** Retention removed events this device never got: say so, never silently. */
function onGap({ text }) {
  const box = $('#retention-notice');
  const line = document.createElement('p');
  line.textContent = text;
  box.appendChild(line);
  box.hidden = false;
}

function logout() {
  if (S.client) S.client.close();
  sessionStorage.removeItem('swiftlet.token');
  window.location.reload();
}

// ------------------------------------------------------------------ wiring

function init() {
  $('#login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('#login-user').value.trim();
    if (token && !S.client) login(token);
  });
  $('#new-chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const peer = $('#peer-input').value.trim();
    if (!ID_RE.test(peer)) { alert('A user id is 1-64 of A-Z a-z 0-9 . _ @ -'); return; }
    $('#peer-input').value = '';
    const c = getConv(`u:${peer}`);
    c.lastAt = Math.max(c.lastAt, Date.now());
    openConversation(c.key);
  });
  $('#new-group-form').addEventListener('submit', (e) => { e.preventDefault(); createGroup(); });
  $('#composer').addEventListener('submit', (e) => { e.preventDefault(); sendCurrent(); });
  $('#message-input').addEventListener('input', onComposerInput);
  $('#logout-button').addEventListener('click', logout);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) scheduleMarkRead(); });
  window.addEventListener('pagehide', () => { if (S.client) S.client.flushAck(); });
  const saved = sessionStorage.getItem('swiftlet.token');
  if (saved) {
    $('#login-user').value = saved;
    login(saved);
  }
}

init();
