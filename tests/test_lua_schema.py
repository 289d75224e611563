"""The Lua scripts and ``broker/store/keys.py`` speak one key schema, and the scripts' records have one builder each.

- ``key()`` in ``_lib.lua`` (the one key builder of the scripts) names every key exactly as ``keys.py`` does, on
  fakeredis's Lua and on a real redis-server.
- ``error_entry()`` in ``_lib.lua`` writes the same bytes as the Python ``error_entry`` (nack entries, import notes).
- No script builds a key by hand (a static check of the sources: ``..`` next to a base or a schema fragment only
  inside ``key()``).
- Every key a script touches is declared in ``KEYS`` or is a run-time key (per message; per group only where the
  groups are read at run time) built from the call's base, in the slot of the declared ones: a workload that runs
  every script, each wrapped in an audit that checks each ``redis.call``. Redis Cluster's rule (docs/keys.md): a
  script's keys are declared and share one slot.

Why an audit wrapper rather than ``MONITOR``: it sees the script's own ``KEYS`` next to each command, works the same
on fakeredis and a real server, and fails the very call that broke the rule (with the key in the message), while
MONITOR would need a second connection, a parser, and ordering between the two streams.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest, PublishResult, now_ms
from broker.ops import transfer
from broker.store import ClaimRequest, RedisStore, error_entry
from broker.store.dead_letters import DeadLetters
from broker.store.diagnose import diagnose
from broker.store.keys import TopicKeys
from broker.store.queues import Queues
from broker.store.scripts import load_script

from .conftest import StoreFactory

SCRIPTS = Path(__file__).resolve().parent.parent / "broker" / "store" / "scripts"
LIB = (SCRIPTS / "_lib.lua").read_text()


async def eval_lib(store: RedisStore, body: str, keys: list[str], args: list[Any]) -> Any:
    """Run ``body`` after _lib.lua (as every script runs) with KEYS ``keys`` and ARGV ``args``."""
    return await store.redis.eval(LIB + "\n" + body, len(keys), *keys, *args)


# ---- one key builder ------------------------------------------------------------------------------------------


SAMPLES = [
    ("mq", "orders", "default", "0192f3a4b5c6d7e8f90a1b2c3d4e", "order-1001", "customer-7"),
    ("t1a2b3", "a.b-c_d", "g-1.x_y", "00000000000000000000000000ff", "with:colon/and space", "k:{x}"),
    ("p", "x", "g", "1", "é€", ""),
]


@pytest.mark.parametrize(("prefix", "topic", "group", "msg_id", "idem", "okey"), SAMPLES)
async def test_lua_key_builder_names_every_key_as_keys_py(
    store_factory: StoreFactory, prefix: str, topic: str, group: str, msg_id: str, idem: str, okey: str
) -> None:
    # Given the base keys.py gives a script (ARGV[1]), When _lib.lua builds each key of the schema from it
    store = await store_factory()
    k = TopicKeys(prefix, topic)
    g = k.group(group)
    body = """
local base, group, id, idem, okey = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local q = group_keys(base, group)
return {key(base, 'groups'), key(base, 'wake'), key(base, 'msg', id), key(base, 'idem', idem),
  key(base, 'imported'), q.gb, q.ready, q.leased, q.delayed, q.dead, q.held, key(q.gb, 'acked'), key(q.gb, 'dlv', id),
  key(q.gb, 'dead', id), key(q.gb, 'key', okey)}
"""
    got = await eval_lib(store, body, [], [k.base, group, msg_id, idem, okey])
    # Then each name is the one keys.py builds
    want = [k.groups, k.wake, k.body(msg_id), k.idem(idem), k.imported, g.base, g.ready, g.leased, g.delayed, g.dead]
    want += [g.held]
    want += [g.acked, g.delivery(msg_id), g.dead_letter(msg_id), g.key_line(okey)]
    assert got == want


async def test_declared_group_keys_are_used_as_given(store_factory: StoreFactory) -> None:
    # Given group keys passed in KEYS, Then group_keys() hands them back rather than building its own
    store = await store_factory()
    body = "local q = group_keys(ARGV[1], 'g', KEYS[1], KEYS[2], KEYS[3], KEYS[4])\n"
    body += "return {q.ready, q.leased, q.delayed, q.dead}"
    got = await eval_lib(store, body, ["{t}a", "{t}b", "{t}c", "{t}d"], ["p:{t}:"])
    assert got == ["{t}a", "{t}b", "{t}c", "{t}d"]


# ---- one error entry ------------------------------------------------------------------------------------------

TEXTS = [
    "db timeout",
    "",
    'quote " and backslash \\ and slash / in https://x/y',
    "".join(chr(c) for c in range(32)) + "\x7f",
    "é€😀 unicode",
    "broker node host-12-ab12 died holding the lease",
    '{"not":"an object"}',
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("at_as", ["number", "string"])
async def test_lua_error_entry_is_byte_for_byte_the_python_one(
    store_factory: StoreFactory, text: str, at_as: str
) -> None:
    # Given an error entry's parts (expire.lua passes numbers, reprocess.lua the time as ARGV text)
    store = await store_factory()
    at = "tonumber(ARGV[3])" if at_as == "number" else "ARGV[3]"
    body = f"return error_entry(tonumber(ARGV[1]), ARGV[2], {at}, ARGV[4])"
    for attempt, consumer in ((0, "operator"), (3, "3f2a-c12.3"), (12, text)):
        # When the Lua helper and the Python one build it, Then they are the same text
        got = await eval_lib(store, body, [], [attempt, text, 1733570000123, consumer])
        assert got == error_entry(attempt, text, 1733570000123, consumer)


# ---- one dead-letter record ------------------------------------------------------------------------------------


async def test_the_dead_letter_record_carries_the_body_and_reprocess_rebuilds_it(store_factory: StoreFactory) -> None:
    # Given a keyed message with its own retry policy, dead-lettered in the only group (its body goes with it)
    store = await store_factory()
    await store.ensure_group(T, "g")
    (res,) = await store.publish_many([req('{"n":1}', headers='{"h":"v"}', key="k", max_attempts=3, backoff_base_ms=7)])
    assert isinstance(res, PublishResult)
    body = await store.redis.hgetall(store.keys(T).body(res.id))
    (d,) = await store.claim(T, "g", 1, 30_000, "c1")
    (out,) = await store.nack_many(T, "g", [(NackItem(d.id, d.receipt, "bad / input", dead=True), 1, "c1")])
    assert out.value == "dead" and not await store.redis.exists(store.keys(T).body(res.id))
    # Then the dead letter holds the documented fields, the body's under their own names, the history as a JSON array
    h = await store.redis.hgetall(store.keys(T).group("g").dead_letter(res.id))
    assert set(h) == {"id", "topic", "group", "payload", "headers", "published_at", "attempts", "errors",
                      "last_consumer", "reason", "died_at", "key", "max_attempts", "backoff_base_ms"}  # fmt: skip
    assert {f: h[f] for f in body if f != "refs"} == {f: v for f, v in body.items() if f != "refs"}
    assert h["errors"] == "[" + error_entry(1, "bad / input", int(h["died_at"]), "c1") + "]"
    (letter,) = await DeadLetters(store).get_many(T, "g", [res.id])
    assert (letter.key, letter.reason, letter.last_consumer, letter.attempts) == ("k", "rejected", "c1", 1)
    # When it is reprocessed, Then the body comes back as it was published
    assert await DeadLetters(store).reprocess(T, "g", [res.id]) == [True]
    assert await store.redis.hgetall(store.keys(T).body(res.id)) == {**body, "refs": "1"}


# ---- no key built by hand -------------------------------------------------------------------------------------

FRAGMENTS = "groups|wake|msg|idem|imported|g|ready|leased|delayed|dead|acked|dlv|key"
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_BASE_CONCAT = re.compile(r"\b(base|gb|q\.gb|q\.base|ARGV\[1\]|KEYS\[\d+\])\s*\.\.|\.\.\s*(base|gb|q\.gb|q\.base)\b")


def _fragment(literal: str) -> bool:
    """A literal that is (or holds, between ':'s) a segment of a key name: 'g:', ':ready', 'dlv:', 'wake'..."""
    if ":" not in literal:
        return re.fullmatch(FRAGMENTS, literal) is not None
    return any(re.fullmatch(FRAGMENTS, part) for part in literal.split(":"))


def hand_built_keys(source: str) -> list[str]:
    """Lines of Lua ``source`` that build a key name by concatenation outside ``key()`` (comments ignored)."""
    out = []
    in_builder = False
    for n, raw in enumerate(source.splitlines(), 1):
        line = raw.split("--", 1)[0] if not raw.lstrip().startswith("--") else ""
        if re.match(r"local function key\(", line):
            in_builder = True
        if in_builder:
            if line.startswith("end"):
                in_builder = False
            continue
        if _BASE_CONCAT.search(line):
            out.append(f"{n}: {raw.strip()}")
            continue
        for m in _LITERAL.finditer(line):
            lit = m.group(1) if m.group(1) is not None else m.group(2)
            before, after = line[: m.start()].rstrip(), line[m.end() :].lstrip()
            if (before.endswith("..") or after.startswith("..")) and _fragment(lit):
                out.append(f"{n}: {raw.strip()}")
                break
    return out


def test_the_hand_built_key_check_catches_the_old_style() -> None:
    # Given lines in the style the scripts used before key(), Then each is caught; key() calls are not
    for bad in (
        "local gb = base .. 'g:' .. group .. ':'",
        "local dkey = ARGV[1] .. 'g:' .. ARGV[2] .. ':dlv:' .. ARGV[3]",
        "redis.call('PUBLISH', prefix .. 'wake', 'k')",
        "local line = gb .. 'key:' .. okey",
        "local x = KEYS[1] .. ':' .. id",
        'local k = p .. "msg:" .. id',
    ):
        assert hand_built_keys(bad), bad
    for good in (
        "local dkey = key(q.gb, 'dlv', id)",
        "local receipt = ARGV[9] .. '-' .. claims",
        "redis.call('ZADD', ledger, now, group .. '/' .. id .. '/dead')",
        "return redis.error_reply('ERR import.lua: unknown op ' .. tostring(kind))",
        "-- KEYS[1] <gb>ready: base .. 'g:' in a comment",
    ):
        assert not hand_built_keys(good), good


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.lua")), ids=lambda p: p.name)
def test_no_script_builds_a_key_by_hand(path: Path) -> None:
    assert not hand_built_keys(path.read_text()), f"{path.name} builds key names outside key() in _lib.lua"


def test_every_script_header_lists_keys_argv_and_returns() -> None:
    for path in sorted(SCRIPTS.glob("*.lua")):
        if path.name.startswith("_"):
            continue
        head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("--"))
        assert head.startswith(f"-- {path.name}: "), path.name
        for part in ("KEYS[1]", "ARGV[1]", "Returns"):
            assert part in head, f"{path.name}: the header does not list {part}"
        uses = set(re.findall(r"KEYS\[(\d+)\]", path.read_text().replace(head, "")))
        listed = set(re.findall(r"KEYS\[(\d+)\]", head))
        assert uses <= listed, f"{path.name} uses KEYS {sorted(uses - listed)} its header does not list"


# ---- every key declared, or a run-time key in the slot ----------------------------------------------------------

# Prepended to each script under audit (before _lib.lua, so every helper sees this ``redis``). A key a command
# touches must be in KEYS, or be a run-time key built from the base of KEYS[1] (same prefix and hash tag): per message
# (msg, idem, dlv, dead letter, ordering key line) or, for the scripts that read their groups at run time, a group's
# own keys. A wake-up channel must carry the same hash tag. Anything else fails the call, naming the key.
AUDIT = r"""
local __real, __name = redis, '%s'
local __base = string.match(KEYS[1] or '', '^(.-{[^}]*}:)')
if not __base then error('audit: ' .. __name .. ': KEYS[1] carries no hash tag: ' .. tostring(KEYS[1])) end
local __declared = {}
for _, k in ipairs(KEYS) do
  if string.match(k, '^(.-{[^}]*}:)') ~= __base then
    error('audit: ' .. __name .. ': KEYS outside the slot of KEYS[1]: ' .. k)
  end
  __declared[k] = true
end
local __RUNTIME = {'^msg:[^:]+$', '^idem:.*$', '^g:[^:]+:dlv:[^:]+$', '^g:[^:]+:dead:[^:]+$', '^g:[^:]+:key:.*$'}
local __RUNTIME_GROUPS = {publish = true, import = true, _depths = true}
local function __check(k)
  if __declared[k] then return end
  if string.sub(k, 1, #__base) ~= __base then error('audit: ' .. __name .. ': key outside the slot: ' .. k) end
  local rest = string.sub(k, #__base + 1)
  for _, p in ipairs(__RUNTIME) do
    if string.match(rest, p) then return end
  end
  if __RUNTIME_GROUPS[__name] and string.match(rest, '^g:[^:]+:[a-z]+$') then return end
  error('audit: ' .. __name .. ': undeclared key ' .. k)
end
local __ALL_KEYS = {DEL = true, EXISTS = true}
local redis = setmetatable({call = function(cmd, ...)
  local c, args = string.upper(cmd), {...}
  if c == 'PUBLISH' or c == 'SPUBLISH' then
    if string.sub(args[1], 1, #__base) ~= __base then error('audit: ' .. __name .. ': channel ' .. args[1]) end
  elseif c == 'PUBSUB' then  -- no key: publish.lua's and promote.lua's count of the listening nodes (one Redis only)
    if (__name ~= 'publish' and __name ~= 'promote') or string.upper(args[1]) ~= 'NUMSUB' then
      error('audit: ' .. __name .. ': PUBSUB')
    end
  elseif __ALL_KEYS[c] then
    for _, k in ipairs(args) do __check(k) end
  else
    __check(args[1])
  end
  return __real.call(cmd, ...)
end}, {__index = __real})
"""


def audited(text: str) -> str:
    names = [n for n in re.findall(r"^-- (\w+)\.lua:", text, flags=re.M) if n != "_lib"]
    return AUDIT % (names[0] if names else "?") + text


@pytest.fixture
def audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every script registered while the test runs is wrapped in the audit (fakeredis's client is a subclass)."""
    for cls in (aioredis.Redis, RedisCluster):
        monkeypatch.setattr(cls, "register_script", _audited_register(cls.register_script))
    yield


def _audited_register(register: Any) -> Any:
    def register_audited(self: Any, script: Any) -> Any:
        return register(self, audited(script))

    return register_audited


async def test_the_audit_catches_an_undeclared_key(store_factory: StoreFactory, audit: None) -> None:
    # Given a script in the style of ack.lua that touches the group's ready list without declaring it
    store = await store_factory()
    k = TopicKeys(store.prefix, "t")
    g = k.group("g")
    script = store.redis.register_script(load_script("extend").replace(
        "local dkey", "redis.call('LLEN', key(ARGV[1], 'g', ARGV[2], 'ready'))\nlocal dkey"))  # fmt: skip
    # Then the call fails and names the key; a declared one, or a hand-built key outside the slot, too
    with pytest.raises(Exception, match=r"undeclared key .*:g:g:ready"):
        await script(keys=[g.leased, g.held], args=[k.base, "g", "1", "r", 5])
    outside = store.redis.register_script(load_script("extend").replace(
        "local dkey", "redis.call('GET', 'elsewhere')\nlocal dkey"))  # fmt: skip
    with pytest.raises(Exception, match="key outside the slot: elsewhere"):
        await outside(keys=[g.leased, g.held], args=[k.base, "g", "1", "r", 5])
    plain = store.redis.register_script(load_script("extend"))
    assert await plain(keys=[g.leased, g.held], args=[k.base, "g", "1", "r", 5]) == 0


T = "orders"


def req(payload: str, **kw: Any) -> PublishRequest:
    return PublishRequest(T, payload, **kw)


async def test_every_script_touches_only_declared_or_run_time_keys_in_its_slot(
    store_factory: StoreFactory, audit: None, backend: str
) -> None:
    # Given a store whose every script runs under the audit (a violation fails the call)
    store = await store_factory(Settings().replace("retry", max_attempts=2))
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")

    # publish.lua: plain, idempotent, delayed, keyed, keyed and delayed, own retry policy; a topic without groups
    res = await store.publish_many([
        req("1"), req("2", idempotency_key="i-1"), req("3", delay_ms=1), req("4", key="a"), req("5", key="a"),
        req("6", key="b", delay_ms=1), req("7", max_attempts=1, backoff_base_ms=5), req("8", key="c"),
    ])  # fmt: skip
    assert all(isinstance(r, PublishResult) and not r.duplicate for r in res), res
    (dup,) = await store.publish_many([req("2", idempotency_key="i-1")])
    assert isinstance(dup, PublishResult) and dup.duplicate
    (fresh,) = await store.publish_many([PublishRequest("fresh", "1")])
    assert isinstance(fresh, PublishResult) and fresh.groups == 1

    # _depths.lua (reads only): each group of the topic, its depths and the publish time of its ready head
    stats = await store.group_stats([T, "fresh"])
    assert [(d.topic, d.group) for d, _ in stats] == [(T, "g1"), (T, "g2"), ("fresh", "default")]
    assert all(d.ready >= 1 and at is not None for d, at in stats), stats

    # claim.lua, ack.lua (a keyed ack lets the next of its key go live), nack.lua (retry, ready, dead), release.lua,
    # extend.lua
    got = {d.payload: d for d in await store.claim(T, "g1", 10, 30_000, "c1")}
    assert set(got) == {"1", "2", "4", "7", "8"}, set(got)
    acks = await store.ack_many(T, "g1", [AckItem(got["4"].id, got["4"].receipt)])
    assert [int(a) for a in acks] == [2]
    assert await store.extend(T, "g1", got["2"].id, got["2"].receipt, 60_000)
    outcomes = await store.nack_many(T, "g1", [
        (NackItem(got["2"].id, got["2"].receipt, "later", delay_ms=60_000), 1, "c1"),
        (NackItem(got["7"].id, got["7"].receipt, "no / more"), 1, "c1"),
        (NackItem(got["8"].id, got["8"].receipt, "bad", dead=True), 1, "c1"),
        (NackItem(got["1"].id, got["1"].receipt, "bad too", dead=True), 1, "c1"),
    ])  # fmt: skip
    assert [o.value for o in outcomes] == ["retry", "dead", "dead", "dead"]
    (five,) = await store.claim(T, "g1", 10, 30_000, "c1")
    assert five.payload == "5"
    assert await store.release(T, "g1", [AckItem(five.id, five.receipt)]) == 1

    # unclaim.lua: a claim whose reply was lost is given back
    lost = ClaimRequest(T, "g2", 2, 30_000, "c2")
    now = now_ms()
    await store.scripts.eval_many([store.messages.claim_call(lost, now)])
    store.messages.uncertain(lost, now)
    assert await store.reconcile_claims() == 2

    # expire.lua (lease expired; held by a dead node) and promote.lua
    short = await store.claim(T, "g2", 1, 1, "c2")
    held = await store.claim(T, "g2", 1, 60_000, "c2")
    assert short and held
    await asyncio.sleep(0.01)  # the 1 ms lease and the 1 ms publish delays have passed
    swept = await store.sweep([(T, "g1"), (T, "g2")], dead_nodes=[store.node_id])
    assert sum(r + d for r, d, _ in swept) >= 2 and sum(p for _, _, p in swept) >= 1, swept

    # reprocess.lua, purge_dead.lua, prune_dead.lua
    dlq = DeadLetters(store)
    dead = [m for m, _ in await dlq.ids(T, "g1")]
    assert len(dead) == 3
    assert await dlq.reprocess(T, "g1", dead[:1]) == [True]
    assert await dlq.purge(T, "g1", dead[1:2]) == [True]  # the third stays, for the export
    assert await dlq.prune([(T, "g1"), (T, "g2")]) == 0

    # repair_key.lua: a keyed head that is in no state (its lease entry lost) is made ready again (diagnose reads
    # INFO, which fakeredis lacks)
    if backend != "fake":
        keyed = [d for d in await store.claim(T, "g2", 10, 60_000, "c2") if d.key]
        assert keyed, "a keyed message leased in g2"
        await store.redis.zrem(store.keys(T).group("g2").leased, keyed[0].id)
        findings = await diagnose(store, repair=True)
        assert any(f.check == "stuck_key_lines" and f.repaired for f in findings), findings

    # import.lua: the topic exported, its keys deleted, imported back (groups, deliveries, dead letters, idem keys)
    f, _ = await transfer.export(store, [T])
    names = [n async for n in store.redis.scan_iter(match=store.keys(T).base + "*", count=1000)]
    await store.redis.delete(*names)
    summary = (await transfer.import_file(store, f)).to_json()
    for kind in ("groups", "deliveries", "dead_letters", "idempotency_keys"):
        assert summary[kind]["imported"] >= 1, summary


async def test_purge_group_touches_only_declared_or_run_time_keys(store_factory: StoreFactory, audit: None) -> None:
    # Given a group with every state (ready, delayed, a keyed head with one waiting, leased, dead) under the audit
    store = await store_factory(Settings().replace("retry", max_attempts=1))
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    await store.publish_many([req("1"), req("2"), req("3", delay_ms=60_000), req("4", key="k"), req("5", key="k")])
    (first, second, *_) = await store.claim(T, "g1", 2, 60_000, "c1")
    await store.nack_many(T, "g1", [(NackItem(second.id, second.receipt, error="x", dead=True), 1, "c1")])
    # When g1's queue is purged, Then ready, delayed and the waiting message go; the leased one stays
    q = Queues(store)
    purged = await q.purge(T, "g1")
    assert purged.counts == {"ready": 1, "delayed": 1, "waiting": 1, "leased": 0, "dead": 0}, purged.counts
    # When g1 is deleted, Then the leased one and the dead letter go too, and g1 is no longer a group of the topic
    deleted = await q.purge(T, "g1", whole_group=True)
    assert deleted.counts == {"ready": 0, "delayed": 0, "waiting": 0, "leased": 1, "dead": 1}, deleted.counts
    assert await store.groups(T) == ["g2"]
    g1 = TopicKeys(store.prefix, T).group("g1").base
    assert [k async for k in store.redis.scan_iter(match=g1.replace("{", "\\{") + "*")] == []
    # And g2 still has all five bodies (g1 held no reference any more)
    assert len(await q.peek(T, "g2", 10)) == 3 and first.id
