// JavaScript client of redis-ws-broker: publish with confirm, consume as an async iterator, reconnect with jittered
// backoff. The same semantics as the Python client (broker/client/client.py), one concept for one concept; the wire
// protocol is docs/protocol.md. An ES module with no dependency: browsers use their native WebSocket; Node >= 20
// passes one (`connect(url, {WebSocket})`, e.g. the `ws` package).
//
// Every publish carries an idempotency key (generated when the caller gives none), so a publish retried after a
// reconnect or an `unavailable` answer is stored once. Subscriptions are restored after a reconnect. A delivery can
// only be settled on the connection that carried it: acking one from a dead connection rejects at once as stale.

// ---- Errors: one class per error-frame code (broker/core/errors.py's table) ----

export class BrokerError extends Error {
  /** @param {string} message @param {{retryAfterMs?: number|null, id?: string|null}} [opts] */
  constructor(message, opts = {}) {
    super(message);
    this.name = new.target.name;
    this.retryAfterMs = opts.retryAfterMs ?? null;
    this.id = opts.id ?? null;
  }
  get code() {
    return "internal";
  }
}
export class ProtocolError extends BrokerError {
  get code() { return "bad_request"; }
}
export class PayloadTooLargeError extends ProtocolError {
  get code() { return "payload_too_large"; }
}
export class UnauthorizedError extends BrokerError {
  get code() { return "unauthorized"; }
}
export class ForbiddenError extends BrokerError {
  get code() { return "forbidden"; }
}
export class RateLimitedError extends BrokerError {
  get code() { return "rate_limited"; }
}
export class NotFoundError extends BrokerError {
  get code() { return "not_found"; }
}
export class StaleReceiptError extends BrokerError {
  get code() { return "stale_receipt"; }
}
export class UnavailableError extends BrokerError {
  get code() { return "unavailable"; }
}

/** code -> class; an unknown code (a newer broker) is a plain BrokerError. */
export const ERROR_CLASSES = Object.freeze({
  bad_request: ProtocolError,
  payload_too_large: PayloadTooLargeError,
  unauthorized: UnauthorizedError,
  forbidden: ForbiddenError,
  rate_limited: RateLimitedError,
  not_found: NotFoundError,
  stale_receipt: StaleReceiptError,
  unavailable: UnavailableError,
  internal: BrokerError,
});

/** The typed error for an `error` frame (or a batch result's `error` object). */
export function errorFromFrame(frame) {
  const cls = ERROR_CLASSES[frame.code] ?? BrokerError;
  return new cls(String(frame.message ?? ""), { retryAfterMs: frame.retry_after_ms ?? null, id: frame.id ?? null });
}

// ---- Small helpers ----

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Full jitter: a random wait in [0, min(capMs, baseMs * 2^attempt)]. */
function jitter(attempt, baseMs, capMs) {
  return Math.random() * Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
}

function randomTag() {
  const bytes = new Uint8Array(6);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The HTTP status of a refused handshake, where the WebSocket implementation tells it (`ws` does; browsers do not). */
function handshakeStatus(ev) {
  const text = String(ev?.message ?? ev?.error?.message ?? "");
  const m = /Unexpected server response: (\d{3})/.exec(text);
  return m ? Number(m[1]) : null;
}

function handshakeError(ev, url) {
  const status = handshakeStatus(ev);
  const where = url.replace(/([?&])token=[^&]*/, "$1token=***");
  if (status === 401) return new UnauthorizedError(`handshake refused with HTTP 401 by ${where}`);
  if (status === 403) return new ForbiddenError(`handshake refused with HTTP 403 by ${where}`);
  if (status === 429) return new RateLimitedError(`handshake refused with HTTP 429 by ${where}`, { retryAfterMs: 1000 });
  const detail = status ? `HTTP ${status}` : String(ev?.message ?? ev?.error?.message ?? "connection failed");
  return new UnavailableError(`cannot connect to ${where}: ${detail}`, { retryAfterMs: 100 });
}

const PUBLISH_FIELDS = [
  ["headers", "headers"],
  ["idempotencyKey", "idempotency_key"],
  ["delayMs", "delay_ms"],
  ["key", "key"],
  ["maxAttempts", "max_attempts"],
  ["backoffBaseMs", "backoff_base_ms"],
];

// ---- Messages and subscriptions ----

/** One delivery. Settle it with ack(), nack() or extend() on the connection that delivered it. */
export class Message {
  constructor(client, conn, f) {
    this.id = f.id;
    this.topic = f.topic;
    this.group = f.group;
    this.payload = f.payload;
    this.headers = f.headers ?? {};
    this.attempt = f.attempt;
    this.receipt = f.receipt;
    this.publishedAt = f.published_at;
    this.leaseExpiresAt = f.lease_expires_at;
    this.key = f.key ?? null;
    Object.defineProperty(this, "_client", { value: client });
    Object.defineProperty(this, "_conn", { value: conn });
  }

  /** Done for this group. `wait: true` resolves on the broker's `acked` instead of once the frame is sent. */
  ack({ wait = false } = {}) {
    return this._client._settle({ op: "ack", id: this.id, receipt: this.receipt }, wait, this._conn);
  }

  /** Give it back: retried after `delayMs` (default: the retry policy's backoff; 0: at once), or dead-lettered. */
  nack({ error = "", delayMs = null, dead = false, wait = false } = {}) {
    const frame = { op: "nack", id: this.id, receipt: this.receipt, error: String(error), dead: Boolean(dead) };
    if (delayMs !== null && delayMs !== undefined) frame.delay_ms = delayMs;
    return this._client._settle(frame, wait, this._conn);
  }

  /** Lease until now + leaseMs (broker time); resolves with the new deadline. */
  async extend(leaseMs) {
    this._client._checkHeld(this._conn, "extend", this.id);
    const reply = await this._client.request({ op: "extend", id: this.id, receipt: this.receipt, lease_ms: leaseMs });
    this.leaseExpiresAt = reply.lease_expires_at;
    return this.leaseExpiresAt;
  }
}

/** Deliveries of one subscribe call, as an async iterator (`for await (const msg of sub)`). */
export class Subscription {
  constructor(client, frame, keys) {
    this.topics = frame.topics;
    this.group = frame.group ?? "default";
    Object.defineProperty(this, "_client", { value: client });
    Object.defineProperty(this, "_frame", { value: frame });
    Object.defineProperty(this, "_keys", { value: keys });
    this._buffer = [];
    this._waiters = [];
    this._end = null; // null while open; {error} once ended (error null: ended cleanly)
  }

  _push(msg) {
    const waiter = this._waiters.shift();
    if (waiter) waiter.resolve({ value: msg, done: false });
    else this._buffer.push(msg);
  }

  _finish(error = null) {
    if (this._end) return;
    this._end = { error };
    for (const w of this._waiters.splice(0)) {
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  /** The next delivery; with `timeoutMs`, rejects with UnavailableError when none came in time. */
  next({ timeoutMs = null } = {}) {
    if (this._buffer.length) return Promise.resolve({ value: this._buffer.shift(), done: false });
    if (this._end) {
      return this._end.error ? Promise.reject(this._end.error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      this._waiters.push(waiter);
      if (timeoutMs !== null) {
        const timer = setTimeout(() => {
          const i = this._waiters.indexOf(waiter);
          if (i >= 0) this._waiters.splice(i, 1);
          reject(new UnavailableError(`no delivery within ${timeoutMs} ms`));
        }, timeoutMs);
        waiter.resolve = (v) => { clearTimeout(timer); resolve(v); };
        waiter.reject = (e) => { clearTimeout(timer); reject(e); };
      }
    });
  }

  /** One delivery (not an iterator result); rejects when the wait runs out or the subscription ended. */
  async get({ timeoutMs = null } = {}) {
    const r = await this.next({ timeoutMs });
    if (r.done) throw new UnavailableError("subscription ended");
    return r.value;
  }

  /** Leaving a `for await` loop keeps the subscription (as in Python); call unsubscribe() to end it. */
  [Symbol.asyncIterator]() {
    return { next: () => this.next(), return: async () => ({ value: undefined, done: true }) };
  }

  /** No new deliveries; those already received stay settleable while their connection lives. */
  async unsubscribe() {
    this._client._forget(this);
    this._finish();
    if (this._client.state === "open") {
      await this._client.request({ op: "unsubscribe", topics: this.topics, group: this.group });
    }
  }
}

// ---- The client ----

/**
 * A connection to the broker. Events (an EventTarget, each a CustomEvent with `detail`):
 * `statechange` {state, previous, error?} with state connecting | open | reconnecting | closed;
 * `paused` {topic, group, reason, retryAfterMs}; `resumed` {topic, group};
 * `error` {error}: an error frame answering no request (e.g. an ack sent without waiting).
 */
export class BrokerClient extends EventTarget {
  constructor(url, opts = {}) {
    super();
    this.url = url;
    this.token = opts.token ?? null;
    this.reconnect = opts.reconnect ?? true;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 30_000;
    this.reconnectDeadlineMs = opts.reconnectDeadlineMs ?? 300_000;
    this.WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass one, e.g. connect(url, {WebSocket}) with the ws package");
    }
    // Browsers cannot set headers on a WebSocket handshake: the token goes in the URL. An implementation passed in
    // (ws in Node) takes options, so the token goes in the Authorization header, out of URLs and logs.
    this.tokenIn = opts.tokenIn ?? (opts.WebSocket && opts.WebSocket !== globalThis.WebSocket ? "header" : "query");
    this.state = "connecting";
    this._conn = null; // {ws, open}: the live connection; deliveries remember the one that carried them
    this._refs = 1;
    this._waiting = new Map(); // ref -> {resolve, reject, timer}
    this._subs = new Map(); // "topic\u0000group" -> Subscription
    this._subList = []; // in subscribe order, for resubscribing
    this._openWaiters = [];
    this._tag = randomTag();
    this._seq = 1;
    this._closing = false;
    // Publishes made in the same turn (a loop, Promise.all) leave as one batch frame (`autoBatch`, PublishBatcher).
    this._batcher = (opts.autoBatch ?? true) ? new PublishBatcher(this) : null;
  }

  _setState(state, error = null) {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    if (state === "open") for (const w of this._openWaiters.splice(0)) w.resolve();
    if (state === "closed") {
      const err = error ?? new UnavailableError("client closed");
      for (const w of this._openWaiters.splice(0)) w.reject(err);
    }
    this.dispatchEvent(new CustomEvent("statechange", { detail: { state, previous, error } }));
  }

  /** Open the first connection; rejects (typed) when it cannot. Reconnects are automatic after that. */
  async connect() {
    this._setState("connecting");
    let conn;
    try {
      conn = await this._open();
    } catch (e) {
      this._setState("closed", e);
      throw e;
    }
    if (this._closing) { // close() was called while the handshake ran
      conn.ws.close();
      throw new UnavailableError("client closed");
    }
    this._setState("open");
    return this;
  }

  _socketUrl() {
    if (!this.token || this.tokenIn !== "query") return this.url;
    const u = new URL(this.url);
    u.searchParams.set("token", this.token);
    return u.toString();
  }

  /** One handshake plus the resubscriptions; resolves with the connection once they are all answered. */
  _open() {
    const WS = this.WebSocket;
    const url = this._socketUrl();
    const headers = this.token && this.tokenIn === "header" ? { Authorization: `Bearer ${this.token}` } : null;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = headers ? new WS(url, [], { headers }) : new WS(url);
      } catch (e) {
        reject(new UnavailableError(`cannot connect to ${this.url}: ${e.message}`));
        return;
      }
      const conn = { ws, open: false, ready: false }; // ready: resubscribed and handed over to the client
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        try { ws.close(); } catch { /* already closing */ }
        reject(err);
      };
      const timer = setTimeout(() => fail(new UnavailableError(`no handshake within ${this.requestTimeoutMs} ms`)),
        this.requestTimeoutMs);
      ws.onerror = (ev) => { clearTimeout(timer); fail(handshakeError(ev, url)); };
      ws.onclose = (ev) => {
        clearTimeout(timer);
        fail(new UnavailableError(`connection closed during handshake (${ev.code})`, { retryAfterMs: 100 }));
      };
      ws.onmessage = (ev) => this._onFrame(conn, ev.data);
      ws.onopen = async () => {
        clearTimeout(timer);
        conn.open = true;
        ws.onerror = () => {}; // a close event follows
        ws.onclose = () => this._onClose(conn);
        const old = this._conn;
        this._conn = conn;
        if (old && old !== conn) try { old.ws.close(); } catch { /* gone */ }
        try {
          for (const sub of this._subList) await this._requestOn(conn, sub._frame, 0);
        } catch (e) {
          fail(e);
          return;
        }
        if (settled) return; // lost (or timed out) while resubscribing
        settled = true;
        conn.ready = true;
        resolve(conn);
      };
    });
  }

  _onClose(conn) {
    conn.open = false;
    const lost = new UnavailableError("connection lost", { retryAfterMs: 100 });
    for (const [ref, w] of this._waiting) {
      if (w.conn === conn) {
        this._waiting.delete(ref);
        clearTimeout(w.timer);
        w.reject(lost);
      }
    }
    if (conn !== this._conn || !conn.ready) return; // superseded, or still opening (its opener retries)
    if (this._closing) return;
    if (!this.reconnect) {
      this._giveUp(lost);
      return;
    }
    this._setState("reconnecting");
    this._reconnectLoop();
  }

  async _reconnectLoop() {
    const deadline = Date.now() + this.reconnectDeadlineMs;
    let last = null;
    for (let attempt = 0; !this._closing && Date.now() < deadline; attempt++) {
      await sleep(Math.min(jitter(attempt, 50, 5_000), Math.max(0, deadline - Date.now())));
      if (this._closing) return;
      try {
        const conn = await this._open();
        if (this._closing) {
          conn.ws.close();
          return;
        }
        this._setState("open");
        return;
      } catch (e) {
        last = e;
      }
    }
    if (!this._closing) this._giveUp(new UnavailableError(`reconnect gave up after ${this.reconnectDeadlineMs} ms: ${last?.message}`));
  }

  _giveUp(error) {
    this._closing = true;
    for (const sub of this._subList) sub._finish(error);
    this._setState("closed", error);
  }

  /** Close the connection; pending requests reject with UnavailableError, subscriptions end. */
  async close() {
    if (this.state === "closed" && this._closing) return;
    this._closing = true;
    const conn = this._conn;
    const closed = new UnavailableError("client closed");
    for (const w of this._waiting.values()) {
      clearTimeout(w.timer);
      w.reject(closed);
    }
    this._waiting.clear();
    for (const sub of this._subList) sub._finish();
    this._setState("closed");
    if (conn && conn.open) {
      await new Promise((resolve) => {
        const t = setTimeout(resolve, 2_000);
        conn.ws.addEventListener("close", () => { clearTimeout(t); resolve(); });
        conn.ws.close(1000);
      });
    }
  }

  _onFrame(conn, data) {
    if (conn !== this._conn) return;
    let f;
    try {
      f = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    this._dispatch(conn, f);
  }

  _dispatch(conn, f) {
    const op = f.op;
    if (op === "messages") {
      for (const item of f.items) this._dispatch(conn, item);
      return;
    }
    if (op === "message") {
      const sub = this._subs.get(`${f.topic}\u0000${f.group}`);
      if (sub) sub._push(new Message(this, conn, f)); // else: not ours (any more); its lease runs out
      return;
    }
    const w = typeof f.ref === "number" ? this._waiting.get(f.ref) : undefined;
    if (w) {
      this._waiting.delete(f.ref);
      clearTimeout(w.timer);
      if (op === "error") w.reject(errorFromFrame(f));
      else if (op === "pulled") w.resolve({ ...f, items: f.items.map((m) => new Message(this, conn, m)) });
      else w.resolve(f);
    } else if (op === "error") {
      this.dispatchEvent(new CustomEvent("error", { detail: { error: errorFromFrame(f) } }));
    } else if (op === "paused") {
      const detail = { topic: f.topic, group: f.group, reason: f.reason, retryAfterMs: f.retry_after_ms ?? null };
      this.dispatchEvent(new CustomEvent("paused", { detail }));
    } else if (op === "resumed") {
      this.dispatchEvent(new CustomEvent("resumed", { detail: { topic: f.topic, group: f.group } }));
    }
  }

  _waitOpen() {
    if (this.state === "open") return Promise.resolve();
    if (this.state === "closed") return Promise.reject(new UnavailableError("client closed"));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      const timer = setTimeout(() => {
        const i = this._openWaiters.indexOf(w);
        if (i >= 0) this._openWaiters.splice(i, 1);
        reject(new UnavailableError(`not connected within ${this.requestTimeoutMs} ms`, { retryAfterMs: 100 }));
      }, this.requestTimeoutMs);
      w.resolve = () => { clearTimeout(timer); resolve(); };
      w.reject = (e) => { clearTimeout(timer); reject(e); };
      this._openWaiters.push(w);
    });
  }

  /** Send `frame` with a fresh ref on `conn` (`encode(ref)`: its JSON text, when already encoded) and wait. */
  _requestOn(conn, frame, extraWaitMs, encode = null) {
    const ref = this._refs++;
    let text;
    try {
      text = encode ? encode(ref) : JSON.stringify({ ...frame, ref });
    } catch (e) {
      // JSON cannot encode it (a BigInt, a cycle): the caller's mistake, final, never retried as an outage
      return Promise.reject(e);
    }
    if (!conn || !conn.open || conn.ws.readyState !== 1) {
      // a closing socket would swallow the frame silently: fail now, as the connection's loss would
      return Promise.reject(new UnavailableError("connection lost", { retryAfterMs: 100 }));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._waiting.delete(ref);
        reject(new UnavailableError(`no answer to ${frame.op} within ${this.requestTimeoutMs + extraWaitMs} ms`));
      }, this.requestTimeoutMs + extraWaitMs);
      this._waiting.set(ref, { resolve, reject, timer, conn });
      try {
        conn.ws.send(text);
      } catch (e) {
        this._waiting.delete(ref);
        clearTimeout(timer);
        reject(new UnavailableError(`send failed: ${e.message}`, { retryAfterMs: 100 }));
      }
    });
  }

  /** Send a frame with a fresh ref and wait for its answer; an `error` answer rejects with its typed error. */
  async request(frame, { extraWaitMs = 0 } = {}) {
    await this._waitOpen();
    return this._requestOn(this._conn, frame, extraWaitMs);
  }

  async _requestText(frame, encode) {
    await this._waitOpen();
    return this._requestOn(this._conn, frame, 0, encode);
  }

  _checkHeld(conn, op, id) {
    if (conn && (conn !== this._conn || !conn.open || conn.ws.readyState !== 1)) {
      throw new StaleReceiptError(`${op} of ${id} not possible: the connection that delivered it is closed; ` +
        "the broker puts it back for redelivery", { id });
    }
  }

  async _settle(frame, wait, conn) {
    this._checkHeld(conn, frame.op, frame.id);
    if (wait) {
      try {
        return await this._requestOn(conn, frame, 0);
      } catch (e) {
        if (e instanceof UnavailableError && !conn.open) this._checkHeld(conn, frame.op, frame.id);
        throw e;
      }
    }
    try {
      conn.ws.send(JSON.stringify(frame));
    } catch {
      this._checkHeld({}, frame.op, frame.id);
    }
    return undefined;
  }

  _key() {
    return `${this._tag}-${this._seq++}`;
  }

  /** Publish and resolve once Redis holds it: {id, duplicate}. Retried (same idempotency key) across outages. */
  async publish(topic, payload, opts = {}) {
    const frame = { op: "publish", topic, payload };
    for (const [js, wire] of PUBLISH_FIELDS) {
      if (opts[js] !== undefined && opts[js] !== null) frame[wire] = opts[js];
    }
    frame.idempotency_key ??= this._key();
    const reply = await this._publishRequest(frame, opts.retry ?? true);
    return { id: reply.id, duplicate: Boolean(reply.duplicate) };
  }

  /**
   * Many messages in one frame (each {topic, payload, ...publish options}). Resolves with one result per message,
   * in order: {id, duplicate} or the BrokerError of that message. A frame refused whole rejects.
   */
  async publishBatch(messages, { retry = true } = {}) {
    const items = messages.map((m) => {
      const item = { topic: m.topic, payload: m.payload };
      for (const [js, wire] of PUBLISH_FIELDS) {
        if (m[js] !== undefined && m[js] !== null) item[wire] = m[js];
      }
      item.idempotency_key ??= this._key();
      return item;
    });
    const reply = await this._publishRequest({ op: "publish", messages: items }, retry);
    return reply.results.map((r) => (r.error ? errorFromFrame(r.error) : { id: r.id, duplicate: Boolean(r.duplicate) }));
  }

  async _publishRequest(frame, retry) {
    const once = this._batcher && !frame.messages ? (f) => this._batcher.publish(f) : (f) => this.request(f);
    if (!retry) return once(frame);
    const deadline = Date.now() + this.reconnectDeadlineMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await once(frame);
      } catch (e) {
        const transient = e instanceof UnavailableError || e instanceof RateLimitedError;
        if (!transient || this._closing || Date.now() >= deadline) throw e;
        await sleep(Math.max(jitter(attempt, 50, 2_000), Math.min(e.retryAfterMs ?? 0, 2_000)));
      }
    }
  }

  /** Consume (topic or topics, one group). Resolves once the broker answered `subscribed`. */
  async subscribe(topic, { group = null, prefetch = null, leaseMs = null, batch = false } = {}) {
    const topics = Array.isArray(topic) ? [...topic] : [topic];
    const frame = { op: "subscribe", topics };
    if (group !== null) frame.group = group;
    if (prefetch !== null) frame.prefetch = prefetch;
    if (leaseMs !== null) frame.lease_ms = leaseMs;
    if (batch) frame.batch = true;
    const keys = topics.map((t) => `${t}\u0000${group ?? "default"}`);
    const sub = new Subscription(this, frame, keys);
    for (const k of keys) this._subs.set(k, sub); // before the request: a delivery may follow `subscribed` at once
    try {
      await this.request(frame);
    } catch (e) {
      for (const k of keys) if (this._subs.get(k) === sub) this._subs.delete(k);
      throw e;
    }
    this._subList.push(sub);
    return sub;
  }

  _forget(sub) {
    for (const k of sub._keys) if (this._subs.get(k) === sub) this._subs.delete(k);
    this._subList = this._subList.filter((s) => s !== sub);
  }

  /** Up to `max` deliveries of (topic, group), waiting up to `waitMs` for the first; [] when none came. */
  async pull(topic, group = null, { max = 1, waitMs = 0, leaseMs = null } = {}) {
    const frame = { op: "pull", topic, max, wait_ms: waitMs };
    if (group !== null) frame.group = group;
    if (leaseMs !== null) frame.lease_ms = leaseMs;
    const reply = await this.request(frame, { extraWaitMs: waitMs });
    return reply.items;
  }

  /** Where a message is in each group of its topic: the rows of `broker message ID`; [] once every group acked. */
  async messageStatus(id, topic) {
    const reply = await this.request({ op: "status", topic, id });
    return reply.groups;
  }

  async ping() {
    await this.request({ op: "ping" });
  }
}

/**
 * Concurrent publishes leave as one batch frame, as in the Python client: every publish made before the current task
 * yields (a loop of publish() calls, Promise.all of many) joins one `publish` frame with `messages`, and each caller
 * still gets its own result or error. One frame, one broker read and one answer instead of N. A lone publish goes as
 * a plain `publish` frame, so an idle publisher waits for nothing (a microtask). The broker refuses a batch whole when
 * one message is invalid or forbidden: then each message is sent again on its own, so one caller's mistake never
 * becomes another caller's error. Batches stay below MAX_BATCH messages and MAX_BATCH_BYTES of message text.
 */
class PublishBatcher {
  static MAX_BATCH = 100;
  static MAX_BATCH_BYTES = 256 * 1024;
  static REFUSED_WHOLE = new Set(["bad_request", "payload_too_large", "forbidden"]);

  constructor(client) {
    this.client = client;
    this.queued = [];
  }

  publish(frame) {
    return new Promise((resolve, reject) => {
      this.queued.push({ frame, resolve, reject });
      if (this.queued.length === 1) queueMicrotask(() => this._flush());
    });
  }

  _flush() {
    const queued = this.queued;
    this.queued = [];
    let chunk = [];
    let size = 0;
    for (const entry of queued) {
      const { op, ...message } = entry.frame;
      try {
        entry.text = JSON.stringify(message);
      } catch (e) { // JSON cannot encode this one (a BigInt, a cycle): it alone fails, the others still leave
        entry.reject(e);
        continue;
      }
      if (chunk.length && (chunk.length >= PublishBatcher.MAX_BATCH ||
          size + entry.text.length > PublishBatcher.MAX_BATCH_BYTES)) {
        this._send(chunk);
        chunk = [];
        size = 0;
      }
      chunk.push(entry);
      size += entry.text.length;
    }
    if (chunk.length) this._send(chunk);
  }

  async _send(chunk) {
    if (chunk.length === 1) {
      this._one(chunk[0]);
      return;
    }
    const body = chunk.map((e) => e.text).join(",");
    let reply;
    try {
      reply = await this.client._requestText({ op: "publish" }, (ref) => `{"op":"publish","ref":${ref},"messages":[${body}]}`);
    } catch (e) {
      if (PublishBatcher.REFUSED_WHOLE.has(e.code)) for (const entry of chunk) this._one(entry);
      else for (const entry of chunk) entry.reject(e);
      return;
    }
    chunk.forEach((entry, i) => {
      const r = reply.results?.[i];
      if (!r) entry.reject(new BrokerError(`batch answer without result ${i}`));
      else if (r.error) entry.reject(errorFromFrame(r.error));
      else entry.resolve(r);
    });
  }

  _one(entry) {
    this.client.request(entry.frame).then(entry.resolve, entry.reject);
  }
}

/** Connect and resolve with an open client (see BrokerClient for the options). */
export async function connect(url, opts = {}) {
  return new BrokerClient(url, opts).connect();
}
