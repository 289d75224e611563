// The JavaScript client against a real broker and redis-server (started here on free loopback ports).
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import * as client from "../broker.js";
import {
  BrokerError,
  ForbiddenError,
  ProtocolError,
  StaleReceiptError,
  UnauthorizedError,
  UnavailableError,
  connect,
} from "../broker.js";
import { Processes, sleep, until, within } from "./harness.js";

const T = 10_000; // the bound of one wait inside a test

test("broker.d.ts declares every name broker.js exports, and nothing else", () => {
  const dts = readFileSync(new URL("../broker.d.ts", import.meta.url), "utf8");
  const declared = [...dts.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, Object.keys(client).sort());
});

test("one error class per code, as broker/core/errors.py", () => {
  const py = readFileSync(new URL("../../../core/errors.py", import.meta.url), "utf8");
  const codes = [...new Set([...py.matchAll(/code = "(\w+)"/g)].map((m) => m[1]))].sort();
  assert.deepEqual(Object.keys(client.ERROR_CLASSES).sort(), codes);
  for (const [code, cls] of Object.entries(client.ERROR_CLASSES)) {
    const e = client.errorFromFrame({ code, message: "m", retry_after_ms: 5 });
    assert.ok(e instanceof cls && e instanceof BrokerError);
    assert.deepEqual([e.code, e.message, e.retryAfterMs], [code, "m", 5]);
  }
  assert.equal(client.errorFromFrame({ code: "newer_code", message: "m" }).code, "internal");
});

describe("JavaScript client against a real broker", { timeout: 120_000 }, () => {
  const procs = new Processes();
  const clients = [];
  const open = async (opts = {}) => {
    const c = await within(T, connect(procs.url, { WebSocket, requestTimeoutMs: 5_000, ...opts }), "connect");
    clients.push(c);
    return c;
  };

  before(async () => {
    await procs.startRedis();
    await procs.startBroker();
  });

  after(async () => {
    await Promise.allSettled(clients.map((c) => c.close()));
    await procs.stop();
  });

  test("publish -> consume -> ack; the message is gone from every group", { timeout: 30_000 }, async () => {
    const c = await open();
    const sub = await c.subscribe("js.basic", { group: "g" });
    const pub = await c.publish("js.basic", { n: 1 }, { headers: { h: "v" }, key: "k1" });
    assert.match(pub.id, /^[0-9a-f]{28}$/);
    assert.equal(pub.duplicate, false);
    const msg = await sub.get({ timeoutMs: T });
    assert.deepEqual([msg.id, msg.payload, msg.headers, msg.attempt, msg.key, msg.group],
      [pub.id, { n: 1 }, { h: "v" }, 1, "k1", "g"]);
    await msg.ack({ wait: true });
    assert.deepEqual(await c.messageStatus(pub.id, "js.basic"), []);
  });

  test("an idempotency key stores once: the second publish is a duplicate with the first id", async () => {
    const c = await open();
    const a = await c.publish("js.idem", 1, { idempotencyKey: "order-17" });
    const b = await c.publish("js.idem", 2, { idempotencyKey: "order-17" });
    assert.deepEqual(b, { id: a.id, duplicate: true });
  });

  test("nack -> redelivery with attempt 2; extend; nack dead -> status dead", { timeout: 30_000 }, async () => {
    const c = await open();
    const sub = await c.subscribe("js.nack", { group: "g", leaseMs: 5_000 });
    const { id } = await c.publish("js.nack", "p");
    const first = await sub.get({ timeoutMs: T });
    assert.equal(first.attempt, 1);
    await first.nack({ error: "try again", delayMs: 0, wait: true });
    const second = await sub.get({ timeoutMs: T });
    assert.deepEqual([second.id, second.attempt], [id, 2]);
    const until_ = await second.extend(20_000);
    assert.ok(until_ > second.publishedAt, `extended to ${until_}`);
    const answer = await second.nack({ error: "poison", dead: true, wait: true });
    assert.equal(answer.outcome, "dead");
    const [row] = await c.messageStatus(id, "js.nack");
    assert.deepEqual([row.group, row.state, row.reason], ["g", "dead", "rejected"]);
  });

  test("publishBatch: one result per message, an invalid batch refused whole", async () => {
    const c = await open();
    const results = await c.publishBatch([
      { topic: "js.batch", payload: 1 },
      { topic: "js.batch", payload: 2, idempotencyKey: "b-2" },
      { topic: "js.batch.other", payload: 3, delayMs: 60_000 },
    ]);
    assert.equal(results.length, 3);
    for (const r of results) assert.match(r.id, /^[0-9a-f]{28}$/);
    const again = await c.publishBatch([{ topic: "js.batch", payload: 2, idempotencyKey: "b-2" }]);
    assert.deepEqual(again, [{ id: results[1].id, duplicate: true }]);
    const [row] = await c.messageStatus(results[2].id, "js.batch.other");
    assert.equal(row.state, "retry_wait");
    await assert.rejects(c.publishBatch([{ topic: "js.batch", payload: 1 }, { topic: "no good", payload: 2 }]),
      (e) => e instanceof ProtocolError && e.code === "bad_request" && /messages\[1\]/.test(e.message));
  });

  test("concurrent publishes leave as batch frames; each caller gets its own answer", async () => {
    const sent = [];
    const Recording = class extends WebSocket {
      send(data, ...rest) {
        sent.push(JSON.parse(data));
        return super.send(data, ...rest);
      }
    };
    const c = await open({ WebSocket: Recording });
    const n = 250;
    const results = await Promise.all(Array.from({ length: n }, (_, i) => c.publish("js.auto", { i })));
    assert.equal(new Set(results.map((r) => r.id)).size, n);
    const publishes = sent.filter((f) => f.op === "publish");
    assert.deepEqual(publishes.map((f) => f.messages?.length ?? 1), [100, 100, 50]);
    // one invalid message refuses its frame whole: the others are sent again alone and stored; it alone fails
    sent.length = 0;
    const mixed = await Promise.allSettled([c.publish("js.auto", 1), c.publish("bad name", 2), c.publish("js.auto", 3)]);
    assert.deepEqual(mixed.map((r) => r.status), ["fulfilled", "rejected", "fulfilled"]);
    assert.ok(mixed[1].reason instanceof ProtocolError, String(mixed[1].reason));
    assert.deepEqual(sent.map((f) => f.messages?.length ?? 1), [3, 1, 1, 1]);
    // a lone publish goes as a plain frame; autoBatch: false sends one frame per publish
    sent.length = 0;
    await c.publish("js.auto", "alone");
    assert.equal(sent[0].topic, "js.auto");
    const plain = await open({ WebSocket: Recording, autoBatch: false });
    sent.length = 0;
    await Promise.all([plain.publish("js.auto", 1), plain.publish("js.auto", 2)]);
    assert.deepEqual(sent.map((f) => f.messages?.length ?? 1), [1, 1]);
  });

  test("a payload JSON cannot encode (BigInt, a cycle) rejects at once with TypeError; the others are stored", async () => {
    const c = await open();
    const cyclic = {};
    cyclic.self = cyclic;
    const turn = await within(T, Promise.allSettled([
      c.publish("js.json", 1), c.publish("js.json", { n: 10n }), c.publish("js.json", cyclic), c.publish("js.json", 4),
    ]), "one turn of publishes");
    assert.deepEqual(turn.map((r) => r.status), ["fulfilled", "rejected", "rejected", "fulfilled"]);
    assert.ok(turn[1].reason instanceof TypeError && turn[2].reason instanceof TypeError, String(turn[1].reason));
    const alone = await within(T, c.publish("js.json", 2n ** 64n).catch((e) => e), "a lone publish");
    assert.ok(alone instanceof TypeError, String(alone));
    const plain = await open({ autoBatch: false });
    assert.ok((await within(T, plain.publish("js.json", 1n).catch((e) => e), "no batcher")) instanceof TypeError);
    const batch = await within(T, c.publishBatch([{ topic: "js.json", payload: 1n }]).catch((e) => e), "batch");
    assert.ok(batch instanceof TypeError, String(batch));
  });

  test("errors are typed and carry the code", async () => {
    const c = await open();
    const err = await c.publish("bad topic!", 1).catch((e) => e);
    assert.ok(err instanceof ProtocolError && err instanceof BrokerError, String(err));
    assert.equal(err.code, "bad_request");
    assert.equal(err.name, "ProtocolError");
    const big = await c.publish("js.err", "x".repeat(300_000)).catch((e) => e);
    assert.equal(big.code, "payload_too_large");
    assert.ok(big instanceof ProtocolError);
    const bad = await c.subscribe("js.err", { prefetch: 0 }).catch((e) => e);
    assert.equal(bad.code, "bad_request");
  });

  test("pull: waits for a delivery, acks it; an empty pull runs out", { timeout: 30_000 }, async () => {
    const c = await open();
    assert.deepEqual(await c.pull("js.pull", "w", { max: 5, waitMs: 0 }), []);
    const waiting = c.pull("js.pull", "w", { max: 5, waitMs: 5_000 });
    const { id } = await c.publish("js.pull", { job: 1 });
    const items = await within(T, waiting, "pull");
    assert.deepEqual(items.map((m) => [m.id, m.payload, m.attempt]), [[id, { job: 1 }, 1]]);
    const [row] = await c.messageStatus(id, "js.pull");
    assert.equal(row.state, "leased");
    await items[0].ack({ wait: true });
    assert.deepEqual(await c.messageStatus(id, "js.pull"), []);
  });

  test("reconnect: kill -9 and restart on the same port", { timeout: 60_000 }, async () => {
    const sent = []; // every frame the client writes, to check what a retry resends
    const Recording = class extends WebSocket {
      send(data, ...rest) {
        sent.push(JSON.parse(data));
        return super.send(data, ...rest);
      }
    };
    const c = await open({ reconnectDeadlineMs: 30_000, WebSocket: Recording });
    const states = [];
    c.addEventListener("statechange", (ev) => states.push(ev.detail.state));
    const sub = await c.subscribe("js.rc", { group: "g", leaseMs: 2_000 });
    const held = await c.publish("js.rc", "held");
    const heldMsg = await sub.get({ timeoutMs: T });
    assert.equal(heldMsg.id, held.id);

    // Given a publish sent just before the broker dies (its answer lost with the connection)
    const inFlight = c.publish("js.rc", "in flight");
    await procs.killBroker();
    await until(T, () => c.state === "reconnecting", "state reconnecting");
    // an ack of a delivery from the dead connection rejects at once as stale (not after the reconnect)
    await within(2_000, assert.rejects(heldMsg.ack(), StaleReceiptError), "stale ack");
    await within(2_000, assert.rejects(heldMsg.nack({ wait: true }), StaleReceiptError), "stale nack");
    // and one published while the broker is down
    const during = c.publish("js.rc", "during outage");
    await sleep(300);
    await procs.startBroker();

    const [a, b] = await within(20_000, Promise.all([inFlight, during]), "publishes confirmed after restart");
    assert.equal(c.state, "open");
    assert.deepEqual(states.slice(0, 2), ["reconnecting", "open"]);
    // each publish went with one idempotency key, the same in every resend
    for (const payload of ["in flight", "during outage"]) {
      const keys = sent.filter((f) => f.op === "publish" && f.payload === payload).map((f) => f.idempotency_key);
      assert.ok(keys.length >= 1 && keys[0] && keys.every((k) => k === keys[0]), `${payload}: ${keys}`);
    }
    assert.equal(sent.filter((f) => f.op === "subscribe").length, 2, "subscribed again after the reconnect");
    // the subscription came back: every message is delivered, each once; then a sentinel closes the window
    const want = new Set([held.id, a.id, b.id]);
    const seen = new Map();
    const deadline = Date.now() + 20_000;
    let sentinel = null;
    while (Date.now() < deadline) {
      const m = await sub.get({ timeoutMs: Math.max(1, deadline - Date.now()) });
      seen.set(m.id, (seen.get(m.id) ?? 0) + 1);
      await m.ack({ wait: true });
      if (sentinel === null && [...want].every((id) => seen.has(id))) {
        sentinel = (await c.publish("js.rc", "sentinel")).id;
      }
      if (m.id === sentinel) break;
    }
    assert.ok(sentinel && seen.has(sentinel), `sentinel delivered; seen ${JSON.stringify([...seen])}`);
    for (const id of [a.id, b.id]) assert.equal(seen.get(id), 1, `${id} delivered once`);
    assert.ok(seen.get(held.id) >= 1);
    for (const id of want) assert.deepEqual(await c.messageStatus(id, "js.rc"), []);
  });

  test("close(): pending waits end, later requests reject unavailable", async () => {
    const c = await open();
    const sub = await c.subscribe("js.close");
    const next = sub.next();
    await c.close();
    assert.deepEqual(await within(T, next, "iterator end"), { value: undefined, done: true });
    await assert.rejects(c.publish("js.close", 1), UnavailableError);
    assert.equal(c.state, "closed");
  });
});

describe("tokens: Authorization header from Node, ?token= as browsers send it", { timeout: 60_000 }, () => {
  const procs = new Processes();
  const clients = [];
  const TOKEN = "js-test-token";

  before(async () => {
    const sha = createHash("sha256").update(TOKEN).digest("hex");
    const file = join(procs.dir, "tokens.toml");
    writeFileSync(file, `[[tokens]]\nname = "js"\nsha256 = "${sha}"\npublish = ["js.*"]\nsubscribe = ["js.*"]\n`);
    await procs.startRedis();
    await procs.startBroker({ BROKER_AUTH_MODE: "tokens", BROKER_AUTH_TOKENS_FILE: file });
  });

  after(async () => {
    await Promise.allSettled(clients.map((c) => c.close()));
    await procs.stop();
  });

  for (const tokenIn of ["header", "query"]) {
    test(`the token in the ${tokenIn} is accepted; a topic outside its patterns is forbidden`, async () => {
      const c = await within(T, connect(procs.url, { WebSocket, token: TOKEN, tokenIn }), "connect");
      clients.push(c);
      assert.equal(c.tokenIn, tokenIn);
      assert.equal(c._socketUrl().includes(TOKEN), tokenIn === "query");
      const { id } = await c.publish("js.auth", 1);
      assert.match(id, /^[0-9a-f]{28}$/);
      const err = await c.publish("other.topic", 1).catch((e) => e);
      assert.ok(err instanceof ForbiddenError, String(err));
      assert.equal(err.code, "forbidden");
    });
  }

  test("a wrong or missing token: connect rejects with UnauthorizedError (HTTP 401)", async () => {
    for (const token of ["wrong", null]) {
      const err = await within(T, connect(procs.url, { WebSocket, token }), "connect").catch((e) => e);
      assert.ok(err instanceof UnauthorizedError, String(err));
      assert.equal(err.code, "unauthorized");
      assert.ok(!String(err.message).includes("wrong"), err.message);
    }
  });
});

describe("Redis outage: paused and resumed events, a publish retried through it", { timeout: 60_000 }, () => {
  const procs = new Processes();
  let c = null;

  before(async () => {
    await procs.startRedis();
    // a short breaker recovery, so that deliveries resume within seconds of Redis coming back
    await procs.startBroker({ BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S: "1", BROKER_REDIS_SOCKET_TIMEOUT_MS: "500" });
  });

  after(async () => {
    await c?.close();
    await procs.stop();
  });

  test("kill -9 of redis-server: paused, then resumed after its restart; the publish is confirmed", async () => {
    c = await within(T, connect(procs.url, { WebSocket, requestTimeoutMs: 5_000 }), "connect");
    const events = [];
    const seen = (type) => new Promise((resolve) => c.addEventListener(type, (ev) => {
      events.push([type, ev.detail.topic, ev.detail.group]);
      resolve(ev.detail);
    }, { once: true }));
    const paused = seen("paused");
    const resumed = seen("resumed");
    const sub = await c.subscribe("js.outage", { group: "g" });
    await procs.killRedis();
    const p = await within(20_000, paused, "paused event");
    assert.deepEqual([p.topic, p.group], ["js.outage", "g"]);
    assert.equal(typeof p.reason, "string");
    const publishing = c.publish("js.outage", "through the outage");
    await sleep(500);
    await procs.startRedis();
    await within(20_000, resumed, "resumed event");
    const { id } = await within(20_000, publishing, "publish confirmed after the outage");
    const m = await sub.get({ timeoutMs: T });
    assert.deepEqual([m.id, m.payload], [id, "through the outage"]);
    await m.ack({ wait: true });
    assert.deepEqual(events.map((e) => e[0]), ["paused", "resumed"]);
    assert.equal(c.state, "open", "the WebSocket connection itself stayed up");
  });
});
