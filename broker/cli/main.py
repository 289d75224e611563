"""Command line: ``broker serve | publish | consume | stats | dlq | export | import | ...``. Thin: each sub-command is
a small function over library code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from broker.core import records as export_format
from broker.core.config import Settings, load_settings
from broker.core.errors import BrokerError, ConfigError
from broker.core.records import LineError, parse_lines
from broker.ops import dlq as dlq_ops
from broker.ops import transfer
from broker.ops.dlq import Filter, parse_duration_ms
from broker.store import RedisStore

if TYPE_CHECKING:
    from broker.client.client import BrokerClient, Message, Subscription

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4

DEFAULT_CONFIG = Path("config/broker.toml")


def _settings(args: argparse.Namespace) -> Settings:
    cli: dict[str, dict[str, Any]] = {}
    if getattr(args, "host", None):
        cli.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        cli.setdefault("server", {})["port"] = args.port
    if getattr(args, "redis_url", None):
        cli.setdefault("redis", {})["url"] = args.redis_url
    config = args.config or os.environ.get("BROKER_CONFIG") or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_settings(config, cli=cli)


def _ws_url(args: argparse.Namespace) -> str:
    return str(args.url)


async def _serve(args: argparse.Namespace) -> int:
    from broker.node.app import Broker

    settings = _settings(args)
    from broker.runtime.logs import configure

    configure(settings.log.level, settings.log.format)
    broker = Broker(settings)
    await broker.run_until_signalled()
    return EXIT_OK


async def _publish(args: argparse.Namespace) -> int:
    from broker.client.client import BrokerClient

    raw = sys.stdin.read() if args.data in (None, "-") else args.data
    lines = raw.splitlines() if args.lines else [raw]
    async with BrokerClient(_ws_url(args), args.token, reconnect=False) as c:
        for line in lines:
            if not line.strip() and args.lines:
                continue
            try:
                payload = orjson.loads(line)
            except orjson.JSONDecodeError:
                payload = line  # not JSON: publish it as a string
            res = await c.publish(
                args.topic,
                payload,
                idempotency_key=args.idempotency_key,
                delay_ms=args.delay_ms,
                key=args.key,
                max_attempts=args.max_attempts,
                backoff_base_ms=args.backoff_base_ms,
            )
            print(orjson.dumps({"id": res.id, "duplicate": res.duplicate}).decode())
    return EXIT_OK


async def _consume(args: argparse.Namespace) -> int:
    from broker.client.client import BrokerClient

    got = 0
    if args.count is not None and args.count <= 0:
        return EXIT_OK
    async with BrokerClient(_ws_url(args), args.token) as c:
        if args.pull:
            batches = _pulled(c, args)
        else:
            sub = await c.subscribe(args.topic, args.group, prefetch=args.prefetch)
            batches = _pushed(sub, args.timeout)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for m in batch:
                    out = {"id": m.id, "topic": m.topic, "group": m.group, "attempt": m.attempt, "payload": m.payload}
                    print(orjson.dumps(out).decode(), flush=True)
                    if not args.no_ack:
                        await m.ack(wait=True)
                    got += 1
                if args.count is not None and got >= args.count:
                    break
    return EXIT_OK if args.count is None or got >= args.count else EXIT_FAILURE


async def _pushed(sub: Subscription, idle_s: float | None) -> AsyncGenerator[list[Message], None]:
    while True:
        try:
            yield [await sub.get(timeout=idle_s)]
        except TimeoutError:
            return


async def _pulled(c: BrokerClient, args: argparse.Namespace) -> AsyncGenerator[list[Message], None]:
    """One pull at a time, for what is still wanted (at most --prefetch); --timeout ends it at the first empty one."""
    wait_ms = int(args.timeout * 1000) if args.timeout is not None else 30_000
    got = 0
    while True:
        want = args.prefetch or 10
        if args.count is not None:
            want = min(want, args.count - got)
        batch = await c.pull(args.topic, args.group, max=want, wait_ms=wait_ms)
        if not batch and args.timeout is not None:
            return
        got += len(batch)
        yield batch


def _open_store(args: argparse.Namespace) -> RedisStore:
    """Operator commands talk to Redis directly (they work while every broker node is down)."""
    from broker.runtime.resilience import Breaker
    from broker.store import connect_redis

    settings = _settings(args)
    url = settings.redis.url or _embedded_url(settings)
    if not url:
        raise ConfigError("no Redis URL: set BROKER_REDIS_URL or --redis-url, or start the embedded broker first")
    breaker = Breaker("redis", fail_max=1_000, reset_timeout_s=1)
    return RedisStore(connect_redis(url, settings), settings, breaker, "cli")


async def _stats_rows(
    store: RedisStore, topic: str | None, memory: bool = False, broken: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows per topic/group, rows per live node, rows per topic with its memory; empty unless ``memory``).
    Topics whose group set cannot be read are left out and named in ``broken`` (the caller reports them)."""
    from broker.store.memory import topic_memory

    pairs = await store.all_pairs(broken if broken is not None else [])
    if topic:
        pairs = [p for p in pairs if p[0] == topic]
    mem_rows: list[dict[str, Any]] = []
    if memory:
        topics = [t for t in await store.topics() if not topic or t == topic]
        mem_rows = [m.to_json() for m in await topic_memory(store, topics)]
    depths = await store.depths(pairs)
    oldest = await store.oldest_ready(pairs)
    nodes = await store.node_status()
    consumers: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for n in nodes:
        for pair, count in orjson.loads(n.get("consumers", "{}")).items():
            consumers[pair] = consumers.get(pair, 0) + int(count)
        for key, values in orjson.loads(n.get("counts", "{}")).items():
            for what, v in values.items():
                counts.setdefault(key, {})[what] = counts.get(key, {}).get(what, 0) + int(v)
    now = time.time() * 1000
    rows = [
        {
            "topic": d.topic, "group": d.group, "ready": d.ready, "leased": d.leased, "delayed": d.delayed,
            "dead": d.dead, "consumers": consumers.get(f"{d.topic}/{d.group}", 0),
            "oldest_ready_age_s": round((now - o) / 1000, 1) if o else None,
            "published": counts.get(d.topic, {}).get("published", 0),
            **{w: counts.get(f"{d.topic}/{d.group}", {}).get(w, 0) for w in ("delivered", "acked", "nacked")},
        }
        for d, o in zip(depths, oldest, strict=True)
    ]  # fmt: skip
    by_topic = {m["topic"]: m for m in mem_rows}
    for r in rows:  # the topic's memory on each of its rows (bodies and idempotency keys are shared by its groups)
        m = by_topic.get(r["topic"])
        if m is not None:
            r.update(topic_keys=m["keys"], topic_memory_bytes=m["memory_bytes"], topic_memory_estimated=m["estimated"])
    node_rows = [
        {
            "node": n["node"], "ready": n.get("ready") == "1", "breakers": orjson.loads(n.get("breakers", "{}")),
            "reasons": orjson.loads(n.get("reasons", "[]")), "loops": orjson.loads(n.get("loops", "{}")),
            "heartbeat_age_s": round((now - int(n.get("heartbeat", "0"))) / 1000, 1),
        }
        for n in nodes
    ]  # fmt: skip
    return rows, node_rows, mem_rows


RATED = ("published", "delivered", "acked", "nacked")  # totals since each node started, summed over live nodes


def _add_rates(rows: list[dict[str, Any]], before: dict[tuple[str, str], dict[str, Any]], dt: float) -> None:
    for r in rows:
        prev = before.get((r["topic"], r["group"]))
        for w in RATED:
            r[f"{w}_per_s"] = round(max(0, r[w] - prev[w]) / dt, 1) if prev else None


async def _stats(args: argparse.Namespace) -> int:
    """Depths, consumers, oldest message age per topic/group; node readiness and breaker states. Rates (publish,
    deliver, ack, nack per second) come from two snapshots: every refresh with --watch, or 2 s apart with --rates."""
    store = _open_store(args)
    previous: dict[tuple[str, str], dict[str, Any]] = {}
    t_prev = 0.0
    try:
        if args.rates and not args.watch:
            rows, _, _ = await _stats_rows(store, args.topic)
            previous, t_prev = {(r["topic"], r["group"]): r for r in rows}, time.monotonic()
            await asyncio.sleep(2.0)
        while True:
            broken: list[str] = []
            rows, nodes, mem = await _stats_rows(store, args.topic, memory=not args.no_memory, broken=broken)
            for problem in broken:  # the rest is still shown; the exit status says something is wrong
                print(f"unreadable topic (run `broker diagnose`): {problem}", file=sys.stderr)
            t = time.monotonic()
            if previous:
                _add_rates(rows, previous, t - t_prev)
            previous, t_prev = {(r["topic"], r["group"]): dict(r) for r in rows}, t
            if args.json:
                doc: Any = rows if not args.nodes else {"groups": rows, "nodes": nodes, "topics": mem}
                print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                cols = ["topic", "group", "ready", "leased", "delayed", "dead", "consumers", "oldest_ready_age_s"]
                if any("acked_per_s" in r for r in rows):
                    cols += [f"{w}_per_s" for w in RATED]
                if rows:
                    _print_table([{c: ("" if r.get(c) is None else r[c]) for c in cols} for r in rows], cols)
                else:
                    print("(no topics)")
                if mem:
                    print()
                    _print_table([_memory_cells(m) for m in mem], ["topic", "keys", "memory"])
                print()
                for n in nodes:
                    state = "ready" if n["ready"] else "NOT READY: " + "; ".join(n["reasons"])
                    breakers = ", ".join(f"{k}={v}" for k, v in n["breakers"].items())
                    print(f"node {n['node']}: {state}; breakers {breakers}; heartbeat {n['heartbeat_age_s']}s ago")
                    for name, problem in n["loops"].items():
                        print(f"  unhealthy loop {name}: {problem}")
                if not nodes:
                    print("(no broker node is running)")
            if not args.watch:
                return EXIT_FAILURE if broken else EXIT_OK
            await asyncio.sleep(args.watch)
    finally:
        await store.close()


def _read_input(path: str) -> bytes:
    """A whole input file ('-': stdin): files are checked whole before anything acts on them."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None


async def _write_output(out: str | None, data: bytes) -> None:
    """To the file ``out``, or stdout when it is None or '-'."""
    if out and out != "-":
        await asyncio.to_thread(Path(out).write_bytes, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _memory_cells(m: dict[str, Any]) -> dict[str, Any]:
    size = _human_bytes(int(m["memory_bytes"]))
    how = f"~{size} (estimate from {m['sampled_keys']} sampled keys)" if m["estimated"] else size
    return {"topic": m["topic"], "keys": m["keys"], "memory": how}


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ids_from_export(path: str) -> frozenset[str]:
    """Dead-letter ids named in a `dlq export` file. The whole file is checked first: a malformed line is an error
    naming its line number, and nothing is changed."""
    ids = set()
    try:
        for n, row in parse_lines(_read_input(path)):
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
                raise LineError(n, "expected a dead letter object with an 'id'")
            ids.add(row["id"])
    except LineError as e:
        raise UsageError(f"{path}:{e.line}: {e.message}; nothing changed") from None
    if not ids:
        raise UsageError(f"{path}: no dead letters in the file; nothing changed")
    return frozenset(ids)


def _filter(args: argparse.Namespace) -> Filter:
    try:
        older = parse_duration_ms(args.older_than) if args.older_than else None
        newer = parse_duration_ms(args.newer_than) if args.newer_than else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    ids = frozenset(getattr(args, "ids", None) or ())
    if getattr(args, "from_file", None):
        ids |= _ids_from_export(args.from_file)
    return Filter(args.topic, args.group, args.error, older, newer, ids)


class UsageError(Exception):
    pass


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())


def _progress(label: str) -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < (0.1 if tty else 2.0):
            return
        last[0] = now
        width = 30
        filled = int(width * done / max(1, total))
        bar = "#" * filled + "." * (width - filled)
        end = "\r" if tty and done < total else "\n"
        print(f"{label} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


async def _dlq_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        letters = await dlq_ops.select(store, _filter(args), args.limit)
    finally:
        await store.close()
    if args.json:
        print(orjson.dumps([d.to_json() for d in letters], option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    now = time.time() * 1000
    rows = [
        {
            "id": d.id, "topic": d.topic, "group": d.group, "attempts": d.attempts, "reason": d.reason,
            "died": f"{(now - d.died_at) / 60000:.0f}m ago", "ttl": f"{d.ttl_s // 3600}h",
            "last_error": (str(d.errors[-1].get("error", "")) if d.errors else "")[:60],
        }
        for d in letters
    ]  # fmt: skip
    if rows:
        _print_table(rows, ["id", "topic", "group", "attempts", "reason", "died", "ttl", "last_error"])
    else:
        print("(no dead letters match)")
    return EXIT_OK


async def _dlq_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        letters = await dlq_ops.select(store, Filter(args.topic, args.group, ids=frozenset([args.id])))
    finally:
        await store.close()
    if not letters:
        print(f"no dead letter {args.id!r} (unknown id, already reprocessed, purged or expired)", file=sys.stderr)
        return EXIT_FAILURE
    for d in letters:
        print(orjson.dumps(d.to_json(), option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


async def _dlq_move(args: argparse.Namespace) -> int:
    """reprocess / purge: select, (confirm), apply, report. Exit 1 if nothing matched or anything was missing."""
    f = _filter(args)
    if f.is_empty() and not args.all:
        raise UsageError("name ids, or a filter (--topic/--group/--error/--older-than/--newer-than), or --all")
    store = _open_store(args)
    try:
        letters = await dlq_ops.select(store, f)
        # Named ids that matched nothing are reported, never skipped silently (and make the exit non-zero).
        unknown = sorted(f.ids - {d.id for d in letters})
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            print(
                f"no dead letter {', '.join(unknown[:10])}{more} (unknown id, already reprocessed, purged or expired)",
                file=sys.stderr,
            )
        if not letters:
            print("no dead letters match: nothing changed", file=sys.stderr)
            return EXIT_FAILURE
        verb = args.cmd_dlq
        done = {"reprocess": "reprocessed", "purge": "purged"}[verb]
        if args.dry_run:
            for d in letters:
                print(f"would {verb} {d.id} ({d.topic}/{d.group}, {d.attempts} attempts, {d.reason})")
            print(f"dry run: {len(letters)} dead letter(s) would be {done}; nothing changed", file=sys.stderr)
            return EXIT_FAILURE if unknown else EXIT_OK
        if verb == "purge" and not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"purge of {len(letters)} dead letter(s) needs --yes when not interactive")
            answer = await asyncio.to_thread(input, f"permanently delete {len(letters)} dead letter(s)? type 'yes': ")
            if answer.strip() != "yes":
                print("not confirmed: nothing changed", file=sys.stderr)
                return EXIT_FAILURE
        progress = _progress(verb) if len(letters) > 100 else None
        if verb == "reprocess":
            moved, missing = await dlq_ops.reprocess(store, letters, args.rate, progress)
        else:
            moved, missing = await dlq_ops.purge(store, letters, progress)
    finally:
        await store.close()
    print(orjson.dumps({done: moved, "missing": unknown + missing}).decode())
    if missing:
        print(f"{len(missing)} dead letter(s) were gone before they could be {done}", file=sys.stderr)
    return EXIT_FAILURE if missing or unknown else EXIT_OK


async def _dlq_export(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        letters = await dlq_ops.select(store, _filter(args))
    finally:
        await store.close()
    await _write_output(args.out, b"".join(orjson.dumps(d.to_json()) + b"\n" for d in letters))
    print(f"exported {len(letters)} dead letter(s)", file=sys.stderr)
    return EXIT_OK


async def _export(args: argparse.Namespace) -> int:
    """Pending messages, dead letters and idempotency keys of the chosen topics as JSON Lines (docs/export.md)."""
    store = _open_store(args)
    try:
        f, missing = await transfer.export(store, args.topic or ())
    finally:
        await store.close()
    await _write_output(args.out, export_format.encode(f))
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        print(f"left out {len(missing)} queue entr(y/ies) whose body was gone (acked meanwhile, or see `broker "
              f"diagnose`): {', '.join(missing[:10])}{more}", file=sys.stderr)  # fmt: skip
    c = f.counts()
    print(f"exported {c['message']} message(s), {c['dead']} dead letter(s), {c['idempotency']} idempotency key(s) "
          f"of {c['topic']} topic(s)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


async def _import(args: argparse.Namespace) -> int:
    """Load an export, idempotently. The whole file is checked first: a bad line is named and nothing is written."""
    try:
        ledger_ttl_ms = parse_duration_ms(args.ledger_ttl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        f = export_format.parse(await asyncio.to_thread(_read_input, args.file))
    except LineError as e:
        raise UsageError(f"{args.file}:{e.line}: {e.message}; nothing imported") from None
    store = _open_store(args)
    try:
        if f.header.prefix != store.prefix:
            print(f"note: exported under key prefix {f.header.prefix!r}, importing under {store.prefix!r}",
                  file=sys.stderr)  # fmt: skip
        progress = _progress("import") if len(f.messages) + len(f.dead) > 1000 else None
        summary = await transfer.import_file(store, f, dry_run=args.dry_run, ledger_ttl_ms=ledger_ttl_ms,
                                             progress=progress)  # fmt: skip
    except LineError as e:
        raise UsageError(f"{args.file}:{e.line}: {e.message}; nothing imported") from None
    finally:
        await store.close()
    print(orjson.dumps(summary.to_json()).decode())
    print(summary.text(), file=sys.stderr)
    return EXIT_OK


async def _diagnose(args: argparse.Namespace) -> int:
    from broker.store.diagnose import diagnose

    store = _open_store(args)
    try:
        findings = await diagnose(store, repair=args.repair)
    finally:
        await store.close()
    if args.json:
        print(orjson.dumps([vars(f) for f in findings], option=orjson.OPT_INDENT_2).decode())
    elif not findings:
        print("ok: no problems found")
    for f in findings if not args.json else []:
        print(f"[{f.severity.upper()}] {f.check}: {f.message}")
        print(f"    fix: {f.fix}")
        if f.repaired:
            print(f"    repaired: {f.repaired}")
    unrepaired = [f for f in findings if not f.repaired]
    return EXIT_FAILURE if unrepaired else EXIT_OK


async def _message(args: argparse.Namespace) -> int:
    from broker.store.status import message_status

    store = _open_store(args)
    try:
        rows = await message_status(store, args.id, args.topic)
    finally:
        await store.close()
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif rows:
        cols = sorted({k for r in rows for k in r} - {"topic", "group", "state"})
        _print_table([{c: r.get(c, "") for c in ["topic", "group", "state", *cols]} for r in rows],
                     ["topic", "group", "state", *cols])  # fmt: skip
    if not rows:
        print(f"message {args.id!r} is not in Redis: acked by every group (or never published)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _token_hash(args: argparse.Namespace) -> int:
    from broker.node.auth import token_hash

    token = args.token if args.token not in (None, "-") else sys.stdin.readline().strip()
    if not token:
        raise UsageError("give a token (or - to read it from stdin)")
    h = token_hash(token)
    print(h)
    print(f'[[tokens]]\nname = "<client name>"\nsha256 = "{h}"\npublish = ["*"]\nsubscribe = ["*"]', file=sys.stderr)
    return EXIT_OK


def _embedded_url(settings: Settings) -> str | None:
    f = Path(settings.redis.data_dir) / "url"
    return f.read_text().strip() if f.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description="Redis-backed WebSocket message broker")
    p.add_argument("--config", help="TOML settings file (default: config/broker.toml when present)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a broker node")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--redis-url", help="use this Redis (default: embedded redis-server)")
    s.set_defaults(fn=_serve)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", default="ws://127.0.0.1:8765/", help="broker WebSocket URL")
        sp.add_argument("--token", help="bearer token")

    pub = sub.add_parser("publish", help="publish a message (JSON, or text as a string)")
    pub.add_argument("topic")
    pub.add_argument("data", nargs="?", help="payload; '-' or omitted reads stdin")
    pub.add_argument("--lines", action="store_true", help="publish each stdin line as one message")
    pub.add_argument("--idempotency-key")
    pub.add_argument("--delay-ms", type=int, default=0)
    pub.add_argument("--key", help="ordering key: one message per key in flight per group, in publish order")
    pub.add_argument("--max-attempts", type=int, help="this message's own attempt limit")
    pub.add_argument("--backoff-base-ms", type=int, help="this message's own retry backoff base")
    client_args(pub)
    pub.set_defaults(fn=_publish)

    con = sub.add_parser("consume", help="consume and ack messages, printing one JSON line each")
    con.add_argument("topic")
    con.add_argument("--group")
    con.add_argument("--count", type=int)
    con.add_argument("--prefetch", type=int)
    con.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    con.add_argument("--no-ack", action="store_true", help="print without acking (messages come back after the lease)")
    con.add_argument(
        "--pull", action="store_true", help="pull (up to --prefetch per request, each waiting --timeout or 30 s)"
    )
    client_args(con)
    con.set_defaults(fn=_consume)

    st = sub.add_parser("stats", help="queue depths per topic and group")
    st.add_argument("--topic")
    st.add_argument("--json", action="store_true")
    st.add_argument("--nodes", action="store_true",
                    help="with --json: an object with the groups, the broker nodes (breakers, unhealthy loops) and "
                    "the memory per topic")  # fmt: skip
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS (Ctrl-C to stop)")
    st.add_argument("--rates", action="store_true", help="sample twice, 2 s apart, to show per-second rates")
    st.add_argument("--no-memory", action="store_true", help="skip the memory per topic (a SCAN of the keyspace)")
    st.add_argument("--redis-url")
    st.set_defaults(fn=_stats)

    mg = sub.add_parser("message", help="where one message is now, per group (ready, leased, retry, dead, done)")
    mg.add_argument("id")
    mg.add_argument("--topic")
    mg.add_argument("--json", action="store_true")
    mg.add_argument("--redis-url")
    mg.set_defaults(fn=_message)

    th = sub.add_parser("token-hash", help="print the sha256 to put in a [[tokens]] table for a token")
    th.add_argument("token", nargs="?", help="the token; '-' or omitted reads one line from stdin")
    th.set_defaults(fn=_token_hash)

    dg = sub.add_parser("diagnose", help="check the Redis a broker uses; exit 1 when something is wrong")
    dg.add_argument("--repair", action="store_true", help="fix what is safe to fix, and say what was done")
    dg.add_argument("--json", action="store_true")
    dg.add_argument("--redis-url")
    dg.set_defaults(fn=_diagnose)

    dlq = sub.add_parser("dlq", help="inspect and act on dead letters").add_subparsers(dest="cmd_dlq", required=True)

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--topic")
        sp.add_argument("--group")
        sp.add_argument("--error", help="case-insensitive text in any recorded error or the reason")
        sp.add_argument("--older-than", help="died at least this long ago (30s, 10m, 2h, 7d)")
        sp.add_argument("--newer-than", help="died at most this long ago")
        sp.add_argument("--redis-url")

    ls = dlq.add_parser("list", help="list dead letters")
    filters(ls)
    ls.add_argument("--limit", type=int)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_dlq_list)

    sh = dlq.add_parser("show", help="one dead letter with its whole history")
    sh.add_argument("id")
    sh.add_argument("--topic")
    sh.add_argument("--group")
    sh.add_argument("--redis-url")
    sh.set_defaults(fn=_dlq_show)

    for name, text in (("reprocess", "move dead letters back to their group's queue"), ("purge", "delete them")):
        mv = dlq.add_parser(name, help=text)
        mv.add_argument("ids", nargs="*", help="dead-letter ids (or use filters / --all)")
        filters(mv)
        mv.add_argument("--all", action="store_true", help="every dead letter (with the other filters, if any)")
        mv.add_argument("--from-file", help="the dead letters listed in a `dlq export` JSON Lines file")
        mv.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        if name == "reprocess":
            mv.add_argument("--rate", type=float, help="at most this many messages per second")
        else:
            mv.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        mv.set_defaults(fn=_dlq_move)

    ex = dlq.add_parser("export", help="write dead letters as JSON Lines")
    filters(ex)
    ex.add_argument("--out", help="file (default stdout)")
    ex.set_defaults(fn=_dlq_export)

    xp = sub.add_parser("export", help="write pending messages and dead letters as JSON Lines (backup, migration)")
    xp.add_argument("--topic", action="append", help="only this topic (repeat for more; default: every topic)")
    xp.add_argument("--out", help="file, or - for stdout (the default)")
    xp.add_argument("--redis-url")
    xp.set_defaults(fn=_export)

    im = sub.add_parser("import", help="load a `broker export` file; importing it again changes nothing")
    im.add_argument("file", help="the export file ('-': stdin)")
    im.add_argument("--dry-run", action="store_true", help="say what would be imported, change nothing")
    im.add_argument("--ledger-ttl", default="7d", help="how long the import ledger remembers what it wrote (7d)")
    im.add_argument("--redis-url")
    im.set_defaults(fn=_import)
    return p


def _run(coro: Any) -> int:
    """uvloop when installed (the event loop is the broker's hot path: ~2x fewer CPU cycles per frame here)."""
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd != "serve":  # operator commands: stdout is their data (JSON lines, tables); log lines go to stderr
        from broker.runtime.logs import configure

        configure("warning", "console")
    try:
        code: int = _run(args.fn(args))
        return code
    except UsageError as e:
        print(f"usage error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        print(f"configuration error: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerError as e:
        print(f"error ({e.code}): {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE if e.code == "unavailable" else EXIT_FAILURE
    except (OSError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK
