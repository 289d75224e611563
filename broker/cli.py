"""Command line: ``broker serve | publish | consume | stats``. Thin: each sub-command is a small function."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from .config import Settings, load_settings
from .errors import BrokerError, ConfigError

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
    config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_settings(config, cli=cli)


def _ws_url(args: argparse.Namespace) -> str:
    return str(args.url)


async def _serve(args: argparse.Namespace) -> int:
    from .app import Broker

    settings = _settings(args)
    from .logging import configure

    configure(settings.log.level, settings.log.format)
    broker = Broker(settings)
    await broker.run_until_signalled()
    return EXIT_OK


async def _publish(args: argparse.Namespace) -> int:
    from .client import BrokerClient

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
            res = await c.publish(args.topic, payload, idempotency_key=args.idempotency_key, delay_ms=args.delay_ms)
            print(orjson.dumps({"id": res.id, "duplicate": res.duplicate}).decode())
    return EXIT_OK


async def _consume(args: argparse.Namespace) -> int:
    from .client import BrokerClient

    got = 0
    async with BrokerClient(_ws_url(args), args.token) as c:
        sub = await c.subscribe(args.topic, args.group, prefetch=args.prefetch)
        while args.count is None or got < args.count:
            try:
                m = await sub.get(timeout=args.timeout)
            except TimeoutError:
                break
            out = {"id": m.id, "topic": m.topic, "group": m.group, "attempt": m.attempt, "payload": m.payload}
            print(orjson.dumps(out).decode(), flush=True)
            if not args.no_ack:
                await m.ack(wait=True)
            got += 1
    return EXIT_OK if args.count is None or got >= args.count else EXIT_FAILURE


async def _stats(args: argparse.Namespace) -> int:
    from .resilience import Breaker
    from .store import RedisStore, connect_redis

    settings = _settings(args)
    url = settings.redis.url or _embedded_url(settings)
    if not url:
        print("no Redis URL: set BROKER_REDIS_URL or --redis-url, or start the embedded broker", file=sys.stderr)
        return EXIT_CONFIG
    breaker = Breaker("redis", fail_max=1_000, reset_timeout_s=1)
    store = RedisStore(connect_redis(url, settings), settings, breaker, "cli")
    try:
        pairs = await store.all_pairs()
        if args.topic:
            pairs = [p for p in pairs if p[0] == args.topic]
        depths = await store.depths(pairs)
    finally:
        await store.close()
    rows = [
        {"topic": d.topic, "group": d.group, "ready": d.ready, "leased": d.leased, "delayed": d.delayed, "dead": d.dead}
        for d in depths
    ]
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        cols = ["topic", "group", "ready", "leased", "delayed", "dead"]
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
        print("  ".join(c.ljust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        if not rows:
            print("(no topics)")
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
    client_args(pub)
    pub.set_defaults(fn=_publish)

    con = sub.add_parser("consume", help="consume and ack messages, printing one JSON line each")
    con.add_argument("topic")
    con.add_argument("--group")
    con.add_argument("--count", type=int)
    con.add_argument("--prefetch", type=int)
    con.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    con.add_argument("--no-ack", action="store_true", help="print without acking (messages come back after the lease)")
    client_args(con)
    con.set_defaults(fn=_consume)

    st = sub.add_parser("stats", help="queue depths per topic and group")
    st.add_argument("--topic")
    st.add_argument("--json", action="store_true")
    st.add_argument("--redis-url")
    st.set_defaults(fn=_stats)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = asyncio.run(args.fn(args))
        return code
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
