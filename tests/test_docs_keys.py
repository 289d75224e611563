"""docs/keys.md stays true: every key ``broker/store/keys.py`` builds is documented, and every ``redis-cli`` command of
the operator's cookbook runs against a real redis-server holding known state and shows what the docs say it shows.

The incident this prevents: an operator copies a documented command during an outage, the key name drifted, and
``LLEN`` answers 0 for a queue that holds a million messages.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.core.config import Settings
from broker.core.model import NackItem, PublishRequest, PublishResult, now_ms
from broker.store import connect_redis
from broker.store.keys import SCHEMA_VERSION, TopicKeys, nodes_key, schema_key, topics_key

from .support import RedisServer, make_store

DOC = Path(__file__).resolve().parent.parent / "docs" / "keys.md"
SETTINGS = Settings()
PREFIX = SETTINGS.redis.key_prefix
TOPIC, GROUP = "orders", "default"
K = TopicKeys(PREFIX, TOPIC)
G = K.group(GROUP)
CONSUMER = "c1.1"
NODE = "test-node"
IDEM = "order-1001"
LEASE_MS = 30_000
RETRY_DELAY_MS = 60_000
PLACEHOLDERS = ("<ready-id>", "<leased-id>", "<retry-id>", "<dead-id>", "<idempotency-key>")


def cookbook() -> list[str]:
    """Every command line of the ```sh blocks of docs/keys.md (each must start with ``redis-cli``)."""
    text = DOC.read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            assert line.startswith("redis-cli "), f"a cookbook line that is not a redis-cli command: {line!r}"
            lines.append(line)
    return lines


@dataclass
class State:
    """What the store holds after ``build_state``; times bracket the calls that stamped them."""

    ids: dict[str, str] = field(default_factory=dict)  # placeholder -> real value
    published: tuple[int, int] = (0, 0)
    claimed: tuple[int, int] = (0, 0)
    nacked: tuple[int, int] = (0, 0)
    beat: tuple[int, int] = (0, 0)
    receipt: str = ""
    all_ids: list[str] = field(default_factory=list)


async def build_state(url: str) -> State:
    """Given topic orders with group default: 5 messages published (the first with an idempotency key), 3 claimed
    by one consumer; then the first nacked dead, the third nacked for a retry in 60 s, the second still leased."""
    store = make_store(connect_redis(url, SETTINGS), SETTINGS, node_id=NODE)
    st = State()
    try:
        await store.redis.flushall()
        assert await store.init_schema() is None
        await store.ensure_group(TOPIC, GROUP)
        t0 = now_ms()
        reqs = [
            PublishRequest(TOPIC, '{"order":1}', '{"source":"shop"}', idempotency_key=IDEM),
            *(PublishRequest(TOPIC, f'{{"order":{n}}}') for n in range(2, 6)),
        ]
        res = await store.publish_many(reqs)
        st.published = (t0, now_ms())
        stored = [r for r in res if isinstance(r, PublishResult)]
        assert len(stored) == len(reqs), res
        assert all(r.groups == 1 and not r.duplicate for r in stored)
        st.all_ids = [r.id for r in stored]
        t0 = now_ms()
        claimed = await store.claim(TOPIC, GROUP, 3, LEASE_MS, CONSUMER)
        st.claimed = (t0, now_ms())
        assert [d.id for d in claimed] == st.all_ids[:3]
        dead, leased, retry = claimed
        t0 = now_ms()
        outcomes = await store.nack_many(
            TOPIC,
            GROUP,
            [
                (NackItem(dead.id, dead.receipt, "invalid order", dead=True), dead.attempt, CONSUMER),
                (NackItem(retry.id, retry.receipt, "db timeout", delay_ms=RETRY_DELAY_MS), retry.attempt, CONSUMER),
            ],
        )
        st.nacked = (t0, now_ms())
        assert [o.value for o in outcomes] == ["dead", "retry"]
        t0 = now_ms()
        await store.heartbeat()
        st.beat = (t0, now_ms())
        st.receipt = leased.receipt
        st.ids = {
            "<ready-id>": st.all_ids[3],
            "<leased-id>": leased.id,
            "<retry-id>": retry.id,
            "<dead-id>": dead.id,
            "<idempotency-key>": IDEM,
        }
    finally:
        await store.close()
    return st


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture(scope="module")
def state(server: RedisServer) -> State:
    return asyncio.run(build_state(server.url))


# ---- what each documented command must show --------------------------------------------------------------------


def lines(out: str) -> list[str]:
    return out.split("\n") if out else []  # not splitlines(): an empty last value is a line of its own


def pairs(out: str) -> list[tuple[str, str]]:
    xs = lines(out)
    assert len(xs) % 2 == 0, out
    return list(zip(xs[::2], xs[1::2], strict=True))


def within(value: str | int, span: tuple[int, int], plus: int = 0) -> bool:
    return span[0] + plus <= int(value) <= span[1] + plus


def check_leased(out: str, st: State) -> None:
    ((member, score),) = pairs(out)
    assert member == st.ids["<leased-id>"] and within(score, st.claimed, LEASE_MS)


def check_held(out: str, st: State) -> None:
    ((member, value),) = pairs(out)  # only the message still on its first delivery; the failed two moved out
    assert member == st.ids["<leased-id>"]
    receipt, node, consumer, okey = value.split("|", 3)
    assert (receipt, node, consumer, okey) == (st.receipt, NODE, CONSUMER, "")
    assert re.fullmatch(r"\d+\.\d+-1", receipt) and within(receipt.split(".")[0], st.claimed)


def check_delivery(out: str, st: State) -> None:
    h = dict(pairs(out))  # the retry: its first delivery's state, moved here by the nack, with its error
    assert set(h) == {"attempts", "claims", "receipt", "consumer", "node", "leased_until", "key", "errors"}
    assert (h["attempts"], h["claims"], h["consumer"], h["node"], h["key"]) == ("1", "1", CONSUMER, NODE, "")
    assert re.fullmatch(r"\d+\.\d+-1", h["receipt"]) and within(h["receipt"].split(".")[0], st.claimed)
    assert within(h["leased_until"], st.claimed, LEASE_MS)


def check_errors(out: str, st: State) -> None:
    (entry,) = json.loads("[" + out + "]")  # stored without the enclosing brackets
    assert entry["attempt"] == 1 and entry["error"] == "db timeout" and entry["consumer"] == CONSUMER
    assert within(entry["at"], st.nacked)


def check_delayed(out: str, st: State) -> None:
    ((member, score),) = pairs(out)
    assert member == st.ids["<retry-id>"] and within(score, st.nacked, RETRY_DELAY_MS)


def check_dead_index(out: str, st: State) -> None:
    ((member, score),) = pairs(out)
    assert member == st.ids["<dead-id>"] and within(score, st.nacked)


def check_dead_letter(out: str, st: State) -> None:
    h = dict(pairs(out))
    assert set(h) == {
        "id",
        "topic",
        "group",
        "payload",
        "headers",
        "published_at",
        "attempts",
        "errors",
        "last_consumer",
        "reason",
        "died_at",
    }
    assert (h["id"], h["topic"], h["group"]) == (st.ids["<dead-id>"], TOPIC, GROUP)
    assert json.loads(h["payload"]) == {"order": 1} and json.loads(h["headers"]) == {"source": "shop"}
    assert (h["attempts"], h["reason"], h["last_consumer"]) == ("1", "rejected", CONSUMER)
    (err,) = json.loads(h["errors"])
    assert err["error"] == "invalid order" and within(err["at"], st.nacked)
    assert within(h["published_at"], st.published) and within(h["died_at"], st.nacked)


def check_ttl(total_s: int) -> Callable[[str, State], None]:
    def check(out: str, st: State) -> None:
        assert total_s - 120 <= int(out) <= total_s, f"TTL {out}, expected about {total_s}"

    return check


def check_body(out: str, st: State) -> None:
    h = dict(pairs(out))
    assert set(h) == {"payload", "headers", "published_at", "refs"}
    assert json.loads(h["payload"]) == {"order": 4} and json.loads(h["headers"]) == {}
    assert h["refs"] == "1" and within(h["published_at"], st.published)


def check_nodes(out: str, st: State) -> None:
    ((member, score),) = pairs(out)
    assert member == NODE and within(score, st.beat)


def check_scan(out: str, st: State) -> None:
    i = st.ids
    assert set(lines(out)) == {
        K.groups,
        K.idem(IDEM),
        G.ready,
        G.leased,
        G.delayed,
        G.dead,
        G.held,
        G.delivery(i["<retry-id>"]),
        G.dead_letter(i["<dead-id>"]),
        *(K.body(m) for m in st.all_ids if m != i["<dead-id>"]),  # a dead letter keeps its own copy of the body
    }


def equals(expected: str | Callable[[State], str]) -> Callable[[str, State], None]:
    def check(out: str, st: State) -> None:
        want = expected(st) if callable(expected) else expected
        assert out == want

    return check


# Keyed by the command as documented (placeholders unsubstituted), with key names built by broker/store/keys.py:
# a renamed key changes the expected command, and the test names what the docs lack.
EXPECTED: dict[tuple[str, ...], Callable[[str, State], None]] = {
    ("SMEMBERS", topics_key(PREFIX)): equals(TOPIC),
    ("SMEMBERS", K.groups): equals(GROUP),
    ("LLEN", G.ready): equals("2"),
    ("ZCARD", G.leased): equals("1"),
    ("ZCARD", G.delayed): equals("1"),
    ("ZCARD", G.dead): equals("1"),
    ("LRANGE", G.ready, "0", "9"): equals(lambda st: "\n".join(st.all_ids[3:])),
    ("ZRANGE", G.leased, "0", "-1", "WITHSCORES"): check_leased,
    ("HGETALL", G.held): check_held,
    ("HGETALL", G.delivery("<retry-id>")): check_delivery,
    ("HGET", G.delivery("<retry-id>"), "errors"): check_errors,
    ("ZRANGE", G.delayed, "0", "-1", "WITHSCORES"): check_delayed,
    ("ZRANGE", G.dead, "0", "-1", "WITHSCORES"): check_dead_index,
    ("HGETALL", G.dead_letter("<dead-id>")): check_dead_letter,
    ("TTL", G.dead_letter("<dead-id>")): check_ttl(SETTINGS.dlq.ttl_s),
    ("HGETALL", K.body("<ready-id>")): check_body,
    ("HGET", K.body("<leased-id>"), "refs"): equals("1"),
    ("GET", K.idem("<idempotency-key>")): equals(lambda st: st.ids["<dead-id>"]),
    ("TTL", K.idem("<idempotency-key>")): check_ttl(SETTINGS.delivery.idempotency_ttl_s),
    ("ZRANGE", nodes_key(PREFIX), "0", "-1", "WITHSCORES"): check_nodes,
    ("GET", schema_key(PREFIX)): equals(SCHEMA_VERSION),
    ("--scan", "--pattern", K.base + "*"): check_scan,
}


def argv(command: str) -> tuple[str, ...]:
    words = shlex.split(command)
    assert words[0] == "redis-cli"
    return tuple(words[1:])


COMMANDS = cookbook()


def test_cookbook_has_exactly_the_checked_commands() -> None:
    documented = [argv(c) for c in COMMANDS]
    assert len(documented) == len(set(documented)), "a cookbook command is listed twice"
    missing = [" ".join(a) for a in EXPECTED if a not in documented]
    unknown = [" ".join(a) for a in documented if a not in EXPECTED]
    assert not missing, f"docs/keys.md lacks these cookbook commands (or spells a key differently): {missing}"
    assert not unknown, f"docs/keys.md has cookbook commands this test does not check: {unknown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_cookbook_command_shows_documented_state(command: str, server: RedisServer, state: State) -> None:
    args = argv(command)
    check = EXPECTED.get(args)
    assert check is not None, f"no expectation for {command!r} (a key name drifted?)"
    real = tuple(_substitute(a, state) for a in args)
    check(server.cli(*real), state)


def _substitute(arg: str, st: State) -> str:
    for placeholder in PLACEHOLDERS:
        arg = arg.replace(placeholder, st.ids[placeholder])
    assert "<" not in arg, f"unknown placeholder in {arg!r}"
    return arg


def test_every_key_of_the_schema_is_documented() -> None:
    # Given the key templates as keys.py builds them with placeholder parts, Then each is named in docs/keys.md
    text = DOC.read_text()
    k = TopicKeys("<prefix>", "<topic>")
    g = k.group("<group>")
    templates = [
        topics_key("<prefix>"),
        schema_key("<prefix>"),
        nodes_key("<prefix>"),
        k.groups,
        k.wake,
        k.body("<id>"),
        k.idem("<key>"),
        k.imported,
        g.ready,
        g.leased,
        g.delayed,
        g.dead,
        g.delivery("<id>"),
        g.dead_letter("<id>"),
        g.key_line("<okey>"),
    ]
    undocumented = [t for t in templates if f"`{t}`" not in text]
    assert not undocumented, f"keys built by broker/store/keys.py but not documented in docs/keys.md: {undocumented}"


def test_every_script_is_documented() -> None:
    # Every transition script (named after its file) appears in the key reference
    text = DOC.read_text()
    scripts = Path(__file__).resolve().parent.parent / "broker" / "store" / "scripts"
    names = sorted(p.name for p in scripts.glob("*.lua") if not p.name.startswith("_"))
    assert names, "no scripts found"
    assert not [n for n in names if f"`{n}`" not in text]
