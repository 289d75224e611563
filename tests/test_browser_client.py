"""The JavaScript client in a real browser (headless Chromium) against a real broker and redis-server: pages on the
broker's origin import ``/client/broker.js`` and use the browser's own WebSocket.

Given a broker process on a throwaway redis-server and pages opened on its origin
When a page publishes (one by one and as a batch), consumes in two groups, acks, and nacks one message dead
Then each group gets every message once, the acked ones are gone, the nacked one is in that group's DLQ with its
     error (as the page's status lookup and the operator's ``broker dlq list`` both say), and a bad publish rejects
     with the typed error;
When 8 pages subscribe at once (one group each) and a Python publisher broadcasts 20 rounds
Then every page gets every round: 8/8 each round, 160/160, no duplicates.
The README's browser page, run as printed, publishes, receives and acks.
"""

from __future__ import annotations

import asyncio
import re

from broker.client.client import BrokerClient

from .brokers import ROOT, BrokerProcess
from .browser import BROWSER, Pages
from .support import Cli, RedisServer

pytestmark = BROWSER

TWO_GROUPS_JS = """async () => {
  const c = await broker.connect(wsUrl);
  const billing = await c.subscribe("orders", {group: "billing", prefetch: 50});
  const shipping = await c.subscribe("orders", {group: "shipping", prefetch: 50});
  const one = await Promise.all([0, 1, 2, 3, 4].map((n) => c.publish("orders", {n}, {headers: {src: "page"}})));
  const batch = await c.publishBatch([5, 6, 7, 8, 9].map((n) => ({topic: "orders", payload: {n}})));
  const ids = [...one, ...batch].map((r) => r.id);
  const got = {billing: [], shipping: []};
  for (let i = 0; i < ids.length; i++) {
    const m = await billing.get({timeoutMs: 20000});
    got.billing.push(m.payload.n);
    await m.ack({wait: true});
  }
  let dead = null;
  for (let i = 0; i < ids.length; i++) {
    const m = await shipping.get({timeoutMs: 20000});
    got.shipping.push(m.payload.n);
    if (m.payload.n === 3) {
      dead = {id: m.id, headers: m.headers, attempt: m.attempt};
      await m.nack({error: "card declined", dead: true, wait: true});
    } else {
      await m.ack({wait: true});
    }
  }
  const deadStatus = await c.messageStatus(dead.id, "orders");
  const ackedStatus = await c.messageStatus(ids[0], "orders");
  let refused = null;
  try {
    await c.publish("no spaces allowed", {n: -1});
  } catch (e) {
    refused = {name: e.name, code: e.code, typed: e instanceof broker.ProtocolError};
  }
  await c.close();
  return {ids, got, dead, deadStatus, ackedStatus, refused, state: c.state};
}"""


async def test_a_page_publishes_consumes_in_two_groups_acks_and_nacks_into_the_dlq(
    broker: BrokerProcess, redis: RedisServer, pages: Pages
) -> None:
    page = await pages.open(broker.http)
    r = await page.evaluate(TWO_GROUPS_JS)

    assert len(set(r["ids"])) == 10
    assert sorted(r["got"]["billing"]) == list(range(10)), r["got"]
    assert sorted(r["got"]["shipping"]) == list(range(10)), r["got"]
    assert r["dead"]["headers"] == {"src": "page"} and r["dead"]["attempt"] == 1
    (row,) = r["deadStatus"]
    assert (row["group"], row["state"], row["reason"]) == ("shipping", "dead", "rejected"), row
    assert r["ackedStatus"] == []  # both groups acked it: nothing is kept
    assert r["refused"] == {"name": "ProtocolError", "code": "bad_request", "typed": True}
    assert r["state"] == "closed"

    (dlq,) = await Cli(redis).json("dlq", "list", "--json", "--error", "card declined")
    assert (dlq["id"], dlq["topic"], dlq["group"], dlq["payload"]) == (r["dead"]["id"], "orders", "shipping", {"n": 3})
    page.check()


PAGES = 8
ROUNDS = 20


async def test_8_pages_each_get_every_broadcast(broker: BrokerProcess, pages: Pages) -> None:
    opened = [await pages.open(broker.http, label=f"agent{i}") for i in range(PAGES)]
    # Given: 8 pages subscribe at once, each in its own group (a broadcast reaches every group)
    await asyncio.gather(*(p.start_consumer("broadcast", f"agent{i}", prefetch=5) for i, p in enumerate(opened)))

    async with BrokerClient(broker.url) as publisher:
        for r in range(ROUNDS):
            # When: a broadcast is published
            await publisher.publish("broadcast", {"round": r})
            # Then: every page gets it (the wait is a safety bound, not a measurement)
            await asyncio.gather(
                *(
                    p.wait_for("(n) => window.consumers.main.received.length >= n", r + 1, timeout_ms=30_000)
                    for p in opened
                )
            )

    for i, p in enumerate(opened):
        run = await p.consumed()
        assert [m["payload"]["round"] for m in run["received"]] == list(range(ROUNDS)), (i, run)
        assert run["errors"] == [] and run["stale"] == 0
        p.check()


BIG = 2**60 + 1  # above 2^53: a JavaScript number cannot hold it


async def test_integers_above_2_53_lose_precision_in_javascript_strings_do_not(
    broker: BrokerProcess, pages: Pages
) -> None:
    """What docs/clients.md tells users: send such numbers (and ids from other systems) as strings."""
    page = await pages.open(broker.http)
    await page.start_consumer("ints", "js")
    async with BrokerClient(broker.url) as py:
        await py.publish("ints", {"big": BIG, "text": str(BIG), "safe": 2**53 - 1})
    await page.wait_for("() => window.consumers.main.received.length >= 1")
    seen = await page.evaluate(
        """() => {
            const p = window.consumers.main.received[0].payload;
            return {big: String(p.big), text: p.text, safe: String(p.safe), bigSafe: Number.isSafeInteger(p.big)};
        }"""
    )
    assert seen["big"] != str(BIG) and float(seen["big"]) == float(BIG)  # the nearest double: 1152921504606847000
    assert (seen["text"], seen["safe"], seen["bigSafe"]) == (str(BIG), str(2**53 - 1), False)
    page.check()


async def test_the_readme_browser_page_publishes_and_consumes(broker: BrokerProcess, pages: Pages) -> None:
    """The README's page, as printed there, against this test's broker (its port in place of 8765)."""
    (html,) = re.findall(r"```html\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert html.count("\n") <= 25, "the README promises a page of about 20 lines"
    page = await pages.open(broker.http, html=html.replace("127.0.0.1:8765", f"127.0.0.1:{broker.port}"))
    await page.wait_for("() => document.getElementById('out').textContent.includes('acked')")
    lines = (await page.page.inner_text("#out")).splitlines()
    assert lines[0].startswith("published ") and lines[1:] == ['received {"id":17,"total":9.5}, attempt 1', "acked"]
    page.check()
