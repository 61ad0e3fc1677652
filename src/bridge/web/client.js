// swiftlet browser client: the wire protocol over WebSocket.
//
// The protocol's single source of truth is protocol/proto/swiftlet.proto. The
// server serves that file at /swiftlet.proto and this module parses it at
// runtime with protobufjs (`protobuf.parse(text).root`), so there is no
// generated code to keep in step with the .proto and no build step. protobufjs
// (npm `protobufjs@7`, BSD-3-Clause) is vendored unmodified as
// /static/protobuf.min.js, its full browser build, and defines the global
// `protobuf`; load it with a classic <script> before this module. Why a
// maintained library rather than hand-written codecs: the Envelope has ~30
// bodies and nested oneofs, and new fields must be skipped, not misread.
//
// 64-bit integers. Message ids are 64-bit (above 2^53, see protocol/README.md
// section 12), so they must never become JavaScript Numbers. protobufjs reads
// uint64 as `protobuf.util.Long` when that is set, and as a (lossy) Number
// otherwise; its browser build does not bundle long.js, so this module
// installs a small BigInt-backed Long with the same shape ({low, high,
// unsigned}, fromBits/fromValue/fromString/toString) before parsing. Outside
// this module every uint64 is a decimal string (see `u64s`) and ids are
// compared as BigInt (see `u64`).
//
// What the client does (protocol/README.md section 13, the state machine):
// - connect(url) opens the socket, hello(token, deviceId) logs in; start()
//   does both and keeps the session up: heartbeat Pings every
//   idle_timeout_ms / 3, a dead-connection check (no frame for two periods),
//   reconnect with exponential backoff and jitter (0.5 s doubling to 30 s,
//   +-50 %, reset once a session stayed up 10 s), no reconnect after a 3xxx
//   error.
// - in a cluster (protocol/README.md, NOT_HOME): a login at a node that is
//   not the user's home gets a fatal NOT_HOME Error whose redirect names
//   the home (so does a session whose partition moved away); the client opens the same URL at redirect.httpAddr (same
//   scheme, so wss stays wss) at once and logs in again (at most
//   MAX_REDIRECTS in a row), emitting 'redirect'. Any other failure sends
//   the next attempt back to the first URL, the node that knows where the
//   user lives now. HOME_UNAVAILABLE (the home is down) waits at least the
//   server's retry_after_ms, with the usual backoff. The home serves the
//   WebSocket to a page loaded from another node only if it allows that
//   origin (`--allow-origin`).
// - requests carry a nonzero request_id that increases on each connection
//   (every frame the client sends takes the next one) and are matched to
//   responses by that id; pushes have request_id 0.
// - send()/sendGroup() put the message in an outbox (kept in localStorage,
//   so it also survives a page reload) with a random client_msg_id; every
//   entry is resent with the same id after each reconnect until its Ack
//   arrives, so the server stores it once.
// - each Deliver is handed to the 'event' listeners, then acknowledged with
//   DeliveryAck (coalesced: one ack for the highest seq of a burst). The
//   server resumes delivery after the device's acknowledged cursor, so a
//   reconnect catches up by itself; redeliveries are dropped by seq.
// - seqs are compared only within one inbox epoch (protocol/README.md
//   section 8): a Welcome with another epoch than the last one (the server
//   restarted after a crash that may have lost its last writes, and may
//   hand the lost seqs to new events) clears the seqs seen, so those new
//   events are not dropped as redeliveries.

/* global protobuf */

const PROTOCOL_VERSION = 1;
const REQUEST_TIMEOUT_MS = 15000;
const DEFAULT_IDLE_TIMEOUT_MS = 60000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const STABLE_AFTER_MS = 10000;
const MAX_REDIRECTS = 3;

// ------------------------------------------------------------- 64-bit ints

/** A BigInt-backed stand-in for long.js's Long: what protobufjs needs. */
class Long {
  constructor(low, high, unsigned) {
    this.low = low | 0;
    this.high = high | 0;
    this.unsigned = Boolean(unsigned);
  }
  static isLong(v) { return v instanceof Long; }
  static fromBits(low, high, unsigned) { return new Long(low, high, unsigned); }
  static fromBigInt(b, unsigned) {
    const x = BigInt.asUintN(64, b);
    return new Long(Number(x & 0xffffffffn), Number(x >> 32n), unsigned);
  }
  static fromNumber(n, unsigned) { return Long.fromBigInt(BigInt(Math.trunc(n || 0)), unsigned); }
  static fromString(s, unsigned) { return Long.fromBigInt(BigInt(String(s).trim() || '0'), unsigned); }
  static fromValue(v, unsigned) {
    if (v instanceof Long) return new Long(v.low, v.high, unsigned ?? v.unsigned);
    if (typeof v === 'bigint') return Long.fromBigInt(v, unsigned);
    if (typeof v === 'number') return Long.fromNumber(v, unsigned);
    if (typeof v === 'string') return Long.fromString(v, unsigned);
    if (v && typeof v === 'object') return new Long(v.low, v.high, unsigned ?? v.unsigned);
    return new Long(0, 0, unsigned);
  }
  toBigInt() {
    const b = (BigInt(this.high >>> 0) << 32n) | BigInt(this.low >>> 0);
    return this.unsigned ? b : BigInt.asIntN(64, b);
  }
  toString() { return this.toBigInt().toString(); }
  toJSON() { return this.toString(); }
  toNumber() { return Number(this.toBigInt()); }
  isZero() { return this.low === 0 && this.high === 0; }
  equals(o) { return this.toBigInt() === Long.fromValue(o).toBigInt(); }
}

/** Any uint64 as it may appear (Long, number, string, bigint) → BigInt. */
export function u64(v) {
  if (v === undefined || v === null || v === '') return 0n;
  if (typeof v === 'bigint') return v;
  if (v instanceof Long) return v.toBigInt();
  if (typeof v === 'number') return BigInt(Math.trunc(v));
  if (typeof v === 'string') return BigInt(v);
  if (typeof v === 'object' && 'low' in v) return Long.fromValue(v, true).toBigInt();
  return BigInt(v);
}

/** Any uint64 → its decimal string (the form the app keeps ids in). */
export function u64s(v) { return u64(v).toString(); }

// --------------------------------------------------------------- the schema

let schemaPromise = null;

/** Fetch /swiftlet.proto and parse it (once per page). */
export function loadSchema(url = '/swiftlet.proto') {
  if (!schemaPromise) {
    schemaPromise = (async () => {
      if (typeof protobuf === 'undefined') {
        throw new Error('protobuf.min.js is not loaded (global `protobuf` missing)');
      }
      // Before parsing: field defaults and the reader's uint64 are set up
      // from util.Long.
      protobuf.util.Long = Long;
      protobuf.configure();
      const res = await fetch(url, { cache: 'no-cache' });
      if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
      const root = protobuf.parse(await res.text()).root;
      root.resolveAll();
      const t = (name) => root.lookupType(`swiftlet.v1.${name}`);
      const e = (name) => root.lookupEnum(`swiftlet.v1.${name}`);
      return {
        root,
        Envelope: t('Envelope'),
        ErrorCode: e('ErrorCode'),
        ReceiptKind: e('ReceiptKind'),
        TypingState: e('TypingState'),
        GroupEventKind: e('GroupEventKind'),
        GroupRole: e('GroupRole'),
      };
    })();
    schemaPromise.catch(() => { schemaPromise = null; });
  }
  return schemaPromise;
}

// ------------------------------------------------------------------ errors

/** A typed protocol error (an Error envelope, or a local failure). */
export class SwiftletError extends Error {
  constructor(code, name, message, fatal = false) {
    super(`${name}${message ? `: ${message}` : ''}`);
    this.code = code;        // numeric ErrorCode, 0 for local failures
    this.codeName = name;    // e.g. 'RATE_LIMITED', 'CONNECTION_LOST'
    this.fatal = fatal;
    this.redirect = null;    // NOT_HOME: {nodeId, tcpAddr, httpAddr} of the user's home
    this.retryAfterMs = 0;   // HOME_UNAVAILABLE, UNAVAILABLE: the server's hint
  }
  /** 1xxx: the request failed; 2xxx: reconnect; 3xxx: do not reconnect. */
  get errorClass() { return Math.floor(this.code / 1000); }
  /** Worth retrying the same request later (same client_msg_id for sends). */
  get retryable() {
    return this.code === 0 || this.errorClass === 2 ||
      this.codeName === 'RATE_LIMITED' || this.codeName === 'STORE_UNAVAILABLE';
  }
}

// ------------------------------------------------------------------ helpers

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

/** A random client_msg_id from the id alphabet (1-64 bytes of [A-Za-z0-9._@-]). */
export function newClientMsgId() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return 'w' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/** A message body as text (text/* content types), else a short description. */
export function bodyText(msg) {
  const ct = msg.contentType || '';
  const body = msg.body || new Uint8Array();
  if (ct === '' || ct.startsWith('text/')) return textDecoder.decode(body);
  return `<${body.length} bytes of ${ct}>`;
}

/** A Conversation object for a 1:1 peer or a group id (string/BigInt). */
export function conversation(target) {
  if (typeof target === 'object' && target !== null) {
    if (target.groupId !== undefined && u64(target.groupId) !== 0n) return { groupId: u64s(target.groupId) };
    if (target.user) return { user: target.user };
  }
  if (typeof target === 'string' && target.startsWith('#')) return { groupId: target.slice(1) };
  return { user: String(target) };
}

/** 'u:bob' or 'g:123': a conversation as a map key. */
export function conversationKey(conv) {
  if (!conv) return '';
  if (conv.kind === 'groupId' || (conv.groupId !== undefined && conv.groupId !== null && u64(conv.groupId) !== 0n && conv.kind !== 'user')) {
    return `g:${u64s(conv.groupId)}`;
  }
  return `u:${conv.user}`;
}

// ------------------------------------------------------------------ client

/**
 * Events (addEventListener; `detail` holds the payload):
 * - 'state'    {state: 'connecting'|'online'|'offline'|'stopped', attempt, retryInMs, error}
 * - 'welcome'  {welcome, first, epochChanged}  after each successful login
 *                                        (epochChanged: seqs seen before were forgotten)
 * - 'event'    {event, source}            each inbox Event once ('deliver' | 'sync')
 * - 'gap'      {from, to, count, text, source}  retention removed events from..to (strings)
 *                                        before this device fetched them: show `text`
 *                                        ("N older messages are no longer available")
 * - 'ack'      {clientMsgId, serverMsgId, timestampMs, entry}
 * - 'sendfailed' {clientMsgId, error, entry}   a send refused for good
 * - 'typing'   {notice}                   a TypingNotice
 * - 'presence' {presence}                 a Presence push
 * - 'error'    {error, requestId}         an Error nobody was waiting for
 * - 'redirect' {nodeId, httpAddr, url}    NOT_HOME: logging in again at the user's home
 */
export class SwiftletClient extends EventTarget {
  /**
   * @param {object} opts
   * @param {string} opts.url        ws:// or wss:// URL of GET /ws
   * @param {string} opts.token      a JWT, or a bare user id for --dev-auth
   * @param {string} opts.deviceId   this device's id (reuse it across reloads)
   * @param {string} [opts.outboxKey] localStorage key of the outbox (null: memory only)
   */
  constructor({ url, token, deviceId, outboxKey = null }) {
    super();
    this.url = url;
    this.entryUrl = url;           // where a login starts again after a failure
    this.redirects = 0;            // NOT_HOME redirects followed in a row
    this.home = null;              // {nodeId, httpAddr} a NOT_HOME sent us to; null: at the first URL
    this.token = token;
    this.deviceId = deviceId;
    this.outboxKey = outboxKey;
    this.schema = null;
    this.ws = null;
    this.state = 'offline';
    this.welcome = null;
    this.user = null;
    this.nextRequestId = 1;
    this.pending = new Map();      // request_id (number) → {resolve, reject, timer, expect}
    this.outbox = new Map();       // client_msg_id → entry
    this.waiters = new Map();      // client_msg_id → [{resolve, reject}]
    this.lastSeq = 0n;             // highest seq handed to 'event' listeners
    this.seen = new Set();         // seqs processed (sync and deliver may overlap), this inbox epoch
    this.epochChanged = false;     // the last Welcome's inbox epoch differed from the one before
    this.ackUpTo = 0n;             // highest seq delivered on this connection, to ack
    this.delivered = 0n;           // last seq delivered on this connection (from the cursor): a jump is a retention gap
    this.ackTimer = null;
    this.acked = 0n;
    this.running = false;
    this.attempt = 0;
    this.backoffTimer = null;
    this.heartbeatTimer = null;
    this.stableTimer = null;
    this.lastSentAt = 0;
    this.lastRecvAt = 0;
    this.pingNonce = 0;
    this.holdUntil = 0;            // test hook: no reconnect before this time
    this.connection = 0;           // counts connections, to ignore stale sockets
    this.loadOutbox();
  }

  // ---------------------------------------------------- connection basics

  /** Open the WebSocket (no login yet). Resolves once it is open. */
  async connect(url = this.url) {
    this.schema = this.schema || await loadSchema();
    this.url = url;
    const id = ++this.connection;
    this.nextRequestId = 1;
    this.ackUpTo = 0n;
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new SwiftletError(0, 'CONNECT_FAILED', `cannot open ${url}`));
      ws.onclose = (ev) => reject(new SwiftletError(0, 'CONNECT_FAILED', `closed (${ev.code}) before open`));
    });
    ws.onmessage = (ev) => { if (id === this.connection) this.onFrame(ev.data); };
    ws.onclose = (ev) => { if (id === this.connection) this.onClosed(ev); };
    ws.onerror = () => {};
    this.lastRecvAt = Date.now();
  }

  /** Log in on the open socket. Resolves with the Welcome. */
  async hello(token = this.token, deviceId = this.deviceId) {
    this.token = token;
    this.deviceId = deviceId;
    const r = await this.request('hello', { protocolVersion: PROTOCOL_VERSION, token, deviceId }, 'welcome');
    const w = {
      userId: r.userId,
      deviceId: r.deviceId,
      cursor: u64s(r.cursor),
      headSeq: u64s(r.headSeq),
      idleTimeoutMs: r.idleTimeoutMs || DEFAULT_IDLE_TIMEOUT_MS,
      maxFrameBytes: r.maxFrameBytes,
      serverVersion: r.serverVersion,
      serverTimeMs: u64s(r.serverTimeMs),
      inboxEpoch: u64s(r.inboxEpoch),
      firstAvailableSeq: u64s(r.firstAvailableSeq),
    };
    this.epochChanged = this.welcome !== null && this.welcome.inboxEpoch !== w.inboxEpoch;
    if (this.epochChanged) {
      this.seen.clear();
      this.lastSeq = u64(w.cursor);
    }
    this.welcome = w;
    this.user = w.userId;
    this.acked = u64(w.cursor);
    this.delivered = u64(w.cursor);
    this.setState('online');
    this.startHeartbeat();
    return w;
  }

  /** Connect, log in and keep the session up (reconnecting) until close(). */
  start() {
    if (this.running) return;
    this.running = true;
    this.loop();
  }

  /** Stop for good (no reconnect). */
  close() {
    this.running = false;
    clearTimeout(this.backoffTimer);
    this.flushAck();
    this.teardown(new SwiftletError(0, 'CLOSED', 'closed by the client'));
    this.setState('offline');
  }

  /**
   * Drop the connection as a network failure would, and stay away for
   * `holdMs` before reconnecting (for tests and the page's "reconnect" link).
   */
  drop(holdMs = 0) {
    this.holdUntil = Date.now() + holdMs;
    this.flushAck();
    if (this.ws) this.ws.close(4000, 'dropped by the client');
  }

  /** Reconnect now: ends a drop()'s hold and the current backoff wait. */
  resume() {
    this.holdUntil = 0;
    if (this.wakeUp) this.wakeUp();
  }

  get online() { return this.state === 'online'; }

  setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: { state, ...extra } }));
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  async loop() {
    while (this.running) {
      this.setState('connecting', { attempt: this.attempt });
      try {
        await this.connect(this.url);
        const first = this.welcome === null;
        await this.hello();
        clearTimeout(this.stableTimer);
        this.stableTimer = setTimeout(() => { this.attempt = 0; this.redirects = 0; }, STABLE_AFTER_MS);
        this.emit('welcome', { welcome: this.welcome, first, epochChanged: this.epochChanged });
        this.resendOutbox();
        // Stay here until the connection ends.
        await new Promise((resolve) => { this.sessionEnded = resolve; });
      } catch (err) {
        this.teardown(err);
        if (err instanceof SwiftletError && err.errorClass === 3) {
          this.running = false;
          this.setState('stopped', { error: err });
          return;
        }
      }
      // NOT_HOME answers a login, or ends a session when the user's
      // partition moved to another node: either way, straight to the home
      // it names, no backoff, the same Hello.
      const err = this.lastError;
      const home = err instanceof SwiftletError && err.codeName === 'NOT_HOME' && err.redirect;
      if (home && home.httpAddr && this.redirects < MAX_REDIRECTS && this.running) {
        this.redirects += 1;
        this.url = redirectedUrl(this.url, home.httpAddr);
        this.home = { nodeId: home.nodeId, httpAddr: home.httpAddr };
        this.emit('redirect', { nodeId: home.nodeId, httpAddr: home.httpAddr, url: this.url });
        continue;
      }
      // Through the first node again: it knows the user's home now.
      this.redirects = 0;
      this.url = this.entryUrl;
      this.home = null;
      if (!this.running) return;
      this.attempt += 1;
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.attempt - 1, 16));
      let wait = Math.round(base * (0.5 + Math.random()));
      wait = Math.max(wait, this.holdUntil - Date.now(), (this.lastError && this.lastError.retryAfterMs) || 0);
      this.setState('offline', { attempt: this.attempt, retryInMs: wait, error: this.lastError });
      await new Promise((resolve) => {
        this.wakeUp = resolve;
        this.backoffTimer = setTimeout(resolve, wait);
      });
      this.wakeUp = null;
      clearTimeout(this.backoffTimer);
    }
  }

  /** The socket closed (or we closed it): fail what waits on it. */
  onClosed(ev) {
    const err = this.closeError || new SwiftletError(0, 'CONNECTION_LOST', `socket closed (${ev.code}${ev.reason ? ` ${ev.reason}` : ''})`);
    this.teardown(err);
  }

  teardown(err) {
    this.lastError = err;
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.stableTimer);
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    const ws = this.ws;
    this.ws = null;
    this.connection += 1;            // frames of the old socket are ignored
    if (ws && ws.readyState <= 1) { try { ws.close(1000); } catch (_) { /* ignore */ } }
    for (const [, p] of this.pending) { clearTimeout(p.timer); p.reject(err); }
    this.pending.clear();
    this.closeError = null;
    if (this.state === 'online') this.setState('offline', { error: err });
    if (this.sessionEnded) { const r = this.sessionEnded; this.sessionEnded = null; r(); }
  }

  // ----------------------------------------------------------------- frames

  /** Encode and send one Envelope with the next request id; returns the id. */
  sendFrame(bodyName, body) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      throw new SwiftletError(0, 'NOT_CONNECTED', 'not connected');
    }
    const requestId = this.nextRequestId++;
    const env = this.schema.Envelope.fromObject({ requestId, [bodyName]: body });
    const bytes = this.schema.Envelope.encode(env).finish();
    if (this.welcome && this.welcome.maxFrameBytes && bytes.length > this.welcome.maxFrameBytes) {
      this.nextRequestId--;
      throw new SwiftletError(1003, 'BODY_TOO_LARGE', `frame of ${bytes.length} bytes is over ${this.welcome.maxFrameBytes}`);
    }
    this.ws.send(bytes);
    this.lastSentAt = Date.now();
    return requestId;
  }

  /**
   * Send a request and wait for its response body (`expect` names the body,
   * e.g. 'ack'). Rejects with SwiftletError on an Error, a lost connection
   * or a timeout.
   */
  request(bodyName, body, expect, timeoutMs = REQUEST_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      let rid;
      try { rid = this.sendFrame(bodyName, body); } catch (e) { reject(e); return; }
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new SwiftletError(0, 'TIMEOUT', `no answer to ${bodyName} in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(rid, { resolve, reject, timer, expect, bodyName });
    });
  }

  onFrame(data) {
    this.lastRecvAt = Date.now();
    let env;
    try {
      env = this.schema.Envelope.decode(new Uint8Array(data));
    } catch (e) {
      this.closeError = new SwiftletError(0, 'MALFORMED_FRAME', `undecodable frame from the server: ${e.message}`);
      if (this.ws) this.ws.close(4001, 'bad frame');
      return;
    }
    const rid = Number(u64(env.requestId));
    const kind = env.body;  // the oneof's set member, or undefined
    if (kind === 'error') {
      const e = env.error;
      const name = this.schema.ErrorCode.valuesById[e.code] || `ERROR_${e.code}`;
      const err = new SwiftletError(e.code, name, e.message, e.fatal || e.code >= 2000);
      err.redirect = e.redirect || null;
      err.retryAfterMs = e.retryAfterMs || 0;
      if (err.fatal) this.closeError = err;
      const p = rid ? this.pending.get(rid) : undefined;
      if (p) {
        this.pending.delete(rid);
        clearTimeout(p.timer);
        p.reject(err);
      } else {
        this.emit('error', { error: err, requestId: rid });
      }
      if (err.fatal && this.ws) this.ws.close(1000);
      return;
    }
    if (rid !== 0) {
      const p = this.pending.get(rid);
      if (!p) return;  // a late answer to a request that timed out
      this.pending.delete(rid);
      clearTimeout(p.timer);
      if (p.expect && kind !== p.expect) {
        p.reject(new SwiftletError(0, 'UNEXPECTED_ANSWER', `${p.bodyName} answered with ${kind}`));
      } else {
        p.resolve(env[kind]);
      }
      return;
    }
    switch (kind) {
      case 'deliver': this.onDeliver(env.deliver.event); break;
      case 'typingNotice': this.emit('typing', { notice: env.typingNotice }); break;
      case 'presence': this.emit('presence', { presence: env.presence }); break;
      default: break;  // a push this version does not know: ignore
    }
  }

  onDeliver(event) {
    if (!event) return;
    const seq = u64(event.seq);
    // Within a connection seqs come gap-free from the cursor on, except
    // where retention removed events (protocol/README.md section 7).
    if (seq > this.delivered + 1n) this.emitGap(this.delivered + 1n, seq - 1n, 'deliver');
    if (seq > this.delivered) this.delivered = seq;
    this.processEvent(event, 'deliver');
    // Acknowledge after processing (listeners ran synchronously above).
    if (seq > this.ackUpTo) this.ackUpTo = seq;
    if (!this.ackTimer) this.ackTimer = setTimeout(() => this.flushAck(), 0);
  }

  /** Tell the listeners retention removed events from..to (bigints). */
  emitGap(from, to, source) {
    const count = to - from + 1n;
    const text = `${count} older ${count === 1n ? 'message is' : 'messages are'} no longer available`
      + ` (events ${from}..${to} ${count === 1n ? 'was' : 'were'} removed by retention)`;
    this.emit('gap', { from: from.toString(), to: to.toString(), count: count.toString(), text, source });
  }

  /** Hand an event to the listeners once (by seq). */
  processEvent(event, source) {
    const seq = u64(event.seq);
    const key = seq.toString();
    if (this.seen.has(key)) return false;
    this.seen.add(key);
    if (seq > this.lastSeq) this.lastSeq = seq;
    this.emit('event', { event, source });
    return true;
  }

  flushAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.ackUpTo > this.acked && this.online) {
      try {
        this.sendFrame('deliveryAck', { upTo: this.ackUpTo.toString() });
        this.acked = this.ackUpTo;
      } catch (_) { /* reconnect redelivers; seqs dedupe */ }
    }
  }

  // ------------------------------------------------------------- heartbeat

  startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    const period = Math.max(1000, Math.floor(this.welcome.idleTimeoutMs / 3));
    const check = Math.min(period, 5000);
    this.heartbeatTimer = setInterval(() => {
      const now = Date.now();
      if (now - this.lastRecvAt > 2 * period + check) {
        // No Pong (nor anything else) for two periods: the link is dead.
        this.closeError = new SwiftletError(0, 'HEARTBEAT_TIMEOUT', 'no answer from the server');
        if (this.ws) this.ws.close(4002, 'heartbeat timeout');
        return;
      }
      if (now - this.lastSentAt >= period) this.ping().catch(() => {});
    }, check);
  }

  /** Ping; resolves with the round-trip time in ms. */
  async ping() {
    const t0 = Date.now();
    await this.request('ping', { nonce: ++this.pingNonce }, 'pong');
    return Date.now() - t0;
  }

  // ----------------------------------------------------------------- sends

  loadOutbox() {
    if (!this.outboxKey) return;
    try {
      const saved = JSON.parse(localStorage.getItem(this.outboxKey) || '[]');
      for (const e of saved) this.outbox.set(e.clientMsgId, e);
    } catch (_) { /* a corrupt outbox is dropped */ }
  }

  saveOutbox() {
    if (!this.outboxKey) return;
    try { localStorage.setItem(this.outboxKey, JSON.stringify([...this.outbox.values()])); } catch (_) { /* full */ }
  }

  /** Messages not acknowledged yet (e.g. to show them as pending). */
  pendingSends() { return [...this.outbox.values()]; }

  /**
   * Send text to a user. Returns {clientMsgId, acked}: `acked` resolves with
   * the Ack once the message is durable, however many reconnects that takes.
   */
  send(toUser, text, contentType = 'text/plain') {
    return this.enqueue({ clientMsgId: newClientMsgId(), toUser, groupId: '0', text, contentType, createdMs: Date.now() });
  }

  /** Post text to a group (groupId as a decimal string or BigInt). */
  sendGroup(groupId, text, contentType = 'text/plain') {
    return this.enqueue({ clientMsgId: newClientMsgId(), toUser: '', groupId: u64s(groupId), text, contentType, createdMs: Date.now() });
  }

  enqueue(entry) {
    this.outbox.set(entry.clientMsgId, entry);
    this.saveOutbox();
    const acked = new Promise((resolve, reject) => {
      const list = this.waiters.get(entry.clientMsgId) || [];
      list.push({ resolve, reject });
      this.waiters.set(entry.clientMsgId, list);
    });
    acked.catch(() => {});
    if (this.online) this.transmit(entry);
    return { clientMsgId: entry.clientMsgId, entry, acked };
  }

  resendOutbox() {
    for (const entry of this.outbox.values()) this.transmit(entry);
  }

  /** One attempt at a Send; a retryable failure waits for the next one. */
  async transmit(entry) {
    if (entry.inFlight === this.connection) return;
    entry.inFlight = this.connection;
    const send = {
      clientMsgId: entry.clientMsgId,
      contentType: entry.contentType,
      body: textEncoder.encode(entry.text),
    };
    if (u64(entry.groupId) !== 0n) send.groupId = entry.groupId; else send.toUser = entry.toUser;
    try {
      const ack = await this.request('send', send, 'ack');
      this.settle(entry, null, {
        clientMsgId: ack.clientMsgId,
        serverMsgId: u64s(ack.serverMsgId),
        timestampMs: u64s(ack.timestampMs),
      });
    } catch (err) {
      entry.inFlight = null;
      if (!(err instanceof SwiftletError) || !err.retryable) {
        this.settle(entry, err, null);
      } else if (err.errorClass === 1 && this.online) {
        // RATE_LIMITED / STORE_UNAVAILABLE: the connection is fine, retry soon.
        setTimeout(() => { if (this.outbox.has(entry.clientMsgId) && this.online) this.transmit(entry); }, 1000);
      }
      // Otherwise the connection is gone: resendOutbox() runs after the reconnect.
    }
  }

  settle(entry, err, ack) {
    if (!this.outbox.has(entry.clientMsgId)) return;
    this.outbox.delete(entry.clientMsgId);
    this.saveOutbox();
    const list = this.waiters.get(entry.clientMsgId) || [];
    this.waiters.delete(entry.clientMsgId);
    if (ack) {
      this.emit('ack', { ...ack, entry });
      for (const w of list) w.resolve(ack);
    } else {
      this.emit('sendfailed', { clientMsgId: entry.clientMsgId, error: err, entry });
      for (const w of list) w.reject(err);
    }
  }

  // -------------------------------------------------------- other requests

  /** One page of the inbox after `after`. Events come back as 'event's too. */
  async sync(after = 0, limit = 100) {
    const b = await this.request('sync', { after: u64s(after), limit }, 'syncBatch');
    return {
      events: b.events || [],
      hasMore: Boolean(b.hasMore),
      headSeq: u64s(b.headSeq),
      firstAvailableSeq: u64s(b.firstAvailableSeq),
      inboxEpoch: u64s(b.inboxEpoch),
    };
  }

  /**
   * Page through the inbox from `after` up to `upTo` (inclusive; the head
   * when omitted), handing each event not seen yet to the 'event'
   * listeners. Returns {gapFrom, gapTo} when retention removed events.
   */
  async syncRange(after = 0n, upTo = null, limit = 200) {
    let cur = u64(after);
    const stop = upTo === null ? null : u64(upTo);
    let gap = null;
    for (;;) {
      if (stop !== null && cur >= stop) break;
      const page = await this.sync(cur, limit);
      const first = u64(page.firstAvailableSeq);
      let to = null;
      if (first > cur + 1n) to = first - 1n;
      else if (first === 0n && u64(page.headSeq) > cur) to = u64(page.headSeq);
      // Past `upTo` it is the deliveries' gap, reported by them.
      if (to !== null && stop !== null && to > stop) to = stop;
      if (!gap && to !== null && to > cur) {
        gap = { gapFrom: (cur + 1n).toString(), gapTo: to.toString() };
        this.emitGap(cur + 1n, to, 'sync');
      }
      for (const ev of page.events) {
        const seq = u64(ev.seq);
        if (stop !== null && seq > stop) return gap;
        this.processEvent(ev, 'sync');
        cur = seq;
      }
      if (!page.hasMore || page.events.length === 0) break;
    }
    return gap;
  }

  async createGroup(name, members) {
    return this.request('createGroup', { name, members }, 'groupInfo');
  }

  // All my groups: the pages (250 groups each) joined.
  async listGroups() {
    const groups = [];
    let after = '0';
    for (;;) {
      const r = await this.request('listGroups', { afterGroupId: after }, 'groupList');
      groups.push(...(r.groups || []));
      if (!r.more || !groups.length) return groups;
      after = u64s(groups[groups.length - 1].groupId);
    }
  }

  // The whole membership: GetGroup pages (500 members each) joined.
  async getGroup(groupId) {
    const info = await this.request('getGroup', { groupId: u64s(groupId) }, 'groupInfo');
    const members = [...(info.members || [])];
    let more = info.moreMembers;
    while (more && members.length) {
      const after = members[members.length - 1].user;
      const page = await this.request('getGroup', { groupId: u64s(groupId), membersAfter: after }, 'groupInfo');
      members.push(...(page.members || []));
      more = page.moreMembers && (page.members || []).length > 0;
    }
    info.members = members;
    info.moreMembers = false;
    return info;
  }

  async addMembers(groupId, users) {
    return this.request('addMembers', { groupId: u64s(groupId), users }, 'groupInfo');
  }

  async leaveGroup(groupId) {
    return this.request('leaveGroup', { groupId: u64s(groupId) }, 'groupInfo');
  }

  /** "I read `conv` up to message id `upTo`" (a user id, '#gid' or a Conversation). */
  async markRead(conv, upTo) {
    return this.request('markRead', { conversation: conversation(conv), upTo: u64s(upTo) }, 'done');
  }

  // Over the whole group: the pages (500 members each) joined.
  async getReceipts(groupId, messageId) {
    const ask = (after) => this.request('getReceipts',
      { groupId: u64s(groupId), messageId: u64s(messageId), membersAfter: after }, 'receiptList');
    const list = await ask('');
    for (const k of ['read', 'delivered', 'pending']) list[k] = [...(list[k] || [])];
    while (list.moreMembers && list.lastMember) {
      const page = await ask(list.lastMember);
      for (const k of ['read', 'delivered', 'pending']) list[k].push(...(page[k] || []));
      list.moreMembers = page.moreMembers;
      list.lastMember = page.lastMember;
    }
    return list;
  }

  /** Typing STARTED / STOPPED. No answer unless refused (reported as 'error'). */
  typing(conv, started) {
    this.sendFrame('typing', {
      conversation: conversation(conv),
      state: started ? 'TYPING_STATE_STARTED' : 'TYPING_STATE_STOPPED',
    });
  }

  /** Replace the presence subscriptions; resolves with the current states. */
  async subscribePresence(users) {
    const r = await this.request('subscribePresence', { users }, 'presenceList');
    return r.users || [];
  }

  async setPrivacy(hideLastSeen) {
    return this.request('setPrivacy', { hideLastSeen }, 'done');
  }
}

/** `url` (ws:// or wss://) with its host:port replaced by a NOT_HOME redirect's http_addr. */
export function redirectedUrl(url, httpAddr) {
  const u = new URL(url);
  u.host = httpAddr;
  return u.toString();
}

/** The ws:// URL of this page's server. */
export function defaultSocketUrl(loc = window.location) {
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}
