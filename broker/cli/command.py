"""Command line: ``broker serve | publish | consume | stats | dlq | export | import | ...``. Parsing and printing
only: each sub-command is a small function in its own module (``broker.cli.<group>``) over library code in
``broker.ops``, ``broker.node`` and ``broker.client``; this module holds the parser and maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker.cli import dlq, inspect, pubsub, queues, serve, stats, transfer
from broker.cli.common import UsageError
from broker.cli.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from broker.cli.parsing import CliParser
from broker.core.errors import BrokerError, ConfigError

#: The broker URL and token of ``publish`` and ``consume`` when no flag gives them. Not ``BROKER_*``: that prefix is
#: the settings' (``BROKER_<SECTION>_<KEY>``, an unknown name is an error), and these are the client's.
ENV_URL = "BROKERCTL_URL"
ENV_TOKEN = "BROKERCTL_TOKEN"
ENV_DEBUG = "BROKERCTL_DEBUG"
DEFAULT_URL = "ws://127.0.0.1:8765/"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("redis-ws-broker")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="broker", description="Redis-backed WebSocket message broker")
    p.add_argument("--version", action="version", version=f"broker {_version()}")
    p.add_argument("--config", help="TOML settings file (default: $BROKER_CONFIG, else ./config/broker.toml)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a broker node")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--redis-url", help="use this Redis (default: embedded redis-server)")
    s.set_defaults(fn=serve.serve)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", default=os.environ.get(ENV_URL) or DEFAULT_URL,
                        help=f"broker WebSocket URL (default: ${ENV_URL}, else {DEFAULT_URL})")  # fmt: skip
        sp.add_argument("--token", default=os.environ.get(ENV_TOKEN) or None,
                        help=f"bearer token (default: ${ENV_TOKEN})")  # fmt: skip

    pub = sub.add_parser("publish", help="publish a message (JSON; --text for a plain string)")
    pub.add_argument("topic")
    pub.add_argument("data", nargs="?", help="payload; '-' or omitted reads stdin")
    pub.add_argument("--lines", action="store_true", help="publish each stdin line as one message")
    pub.add_argument("--text", action="store_true", help="the payload is a plain string, not JSON")
    pub.add_argument("--idempotency-key")
    pub.add_argument("--delay-ms", type=int, default=0)
    pub.add_argument("--key", help="ordering key: one message per key in flight per group, in publish order")
    pub.add_argument("--max-attempts", type=int, help="this message's own attempt limit")
    pub.add_argument("--backoff-base-ms", type=int, help="this message's own retry backoff base")
    client_args(pub)
    pub.set_defaults(fn=pubsub.publish)

    con = sub.add_parser("consume", help="consume and ack messages, printing one JSON line each")
    con.add_argument("topic")
    con.add_argument("--group", help="the consumer group (durable: it keeps every later message until consumed)")
    con.add_argument("--ephemeral", action="store_true",
                     help="a group of its own, deleted when the command ends (needs Redis: --redis-url or the "
                     "broker's settings)")  # fmt: skip
    con.add_argument("--redis-url", help="with --ephemeral: the Redis to delete the group from")
    con.add_argument("--count", type=int)
    con.add_argument("--prefetch", type=int)
    con.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    con.add_argument("--no-ack", action="store_true", help=argparse.SUPPRESS)  # gone: it burned an attempt; `peek`
    con.add_argument(
        "--pull", action="store_true", help="pull (up to --prefetch per request, each waiting --timeout or 30 s)"
    )
    client_args(con)
    con.set_defaults(fn=pubsub.consume)

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
    st.set_defaults(fn=stats.stats)

    pk = sub.add_parser("peek", help="show a group's next ready messages without consuming them (no attempt counted)")
    pk.add_argument("topic")
    pk.add_argument("--group", required=True)
    pk.add_argument("--count", type=int, default=10, help="how many (10)")
    pk.add_argument("--start", type=int, default=0, help="from this queue position (0: the next one delivered)")
    pk.add_argument("--json", action="store_true")
    pk.add_argument("--redis-url")
    pk.set_defaults(fn=queues.peek)

    cs = sub.add_parser("consumers", help="per group: consumers connected, deliveries each one holds, redeliveries")
    cs.add_argument("topic")
    cs.add_argument("--group", help="only this group")
    cs.add_argument("--json", action="store_true")
    cs.add_argument("--redis-url")
    cs.set_defaults(fn=queues.consumers)

    gp = sub.add_parser("group", help="purge or delete a consumer group").add_subparsers(dest="cmd_group",
                                                                                        required=True)  # fmt: skip
    for name, text, fn in (
        ("purge", "remove a group's ready and delayed messages (the group stays)", queues.group_purge),
        ("delete", "delete a group and everything it holds; later publishes no longer store for it",
         queues.group_delete),
    ):  # fmt: skip
        g = gp.add_parser(name, help=text)
        g.add_argument("topic")
        g.add_argument("group")
        g.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if name == "delete":
            g.add_argument("--force", action="store_true", help="even while consumers of it are connected")
        g.add_argument("--json", action="store_true")
        g.add_argument("--redis-url")
        g.set_defaults(fn=fn)

    tp = sub.add_parser("topic", help="delete a topic").add_subparsers(dest="cmd_topic", required=True)
    td = tp.add_parser("delete", help="delete every group of a topic and every key it has")
    td.add_argument("topic")
    td.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    td.add_argument("--force", action="store_true", help="even while consumers are connected")
    td.add_argument("--json", action="store_true")
    td.add_argument("--redis-url")
    td.set_defaults(fn=queues.topic_delete)

    mg = sub.add_parser("message", help="where one message is now, per group (ready, leased, retry, dead, done)")
    mg.add_argument("id")
    mg.add_argument("--topic")
    mg.add_argument("--json", action="store_true")
    mg.add_argument("--redis-url")
    mg.set_defaults(fn=inspect.message)

    th = sub.add_parser("token-hash", help="print the sha256 to put in a [[tokens]] table for a token")
    th.add_argument("token", nargs="?", help="the token; '-' or omitted reads one line from stdin")
    th.add_argument("--json", action="store_true")
    th.set_defaults(fn=inspect.token_hash)

    dg = sub.add_parser("diagnose", help="check the Redis a broker uses; exit 1 when something is wrong")
    dg.add_argument("--repair", action="store_true", help="fix what is safe to fix, and say what was done")
    dg.add_argument("--json", action="store_true")
    dg.add_argument("--redis-url")
    dg.set_defaults(fn=inspect.diagnose)

    dq = sub.add_parser("dlq", help="inspect and act on dead letters").add_subparsers(dest="cmd_dlq", required=True)

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--topic")
        sp.add_argument("--group")
        sp.add_argument("--error", help="case-insensitive text in any recorded error or the reason")
        sp.add_argument("--older-than", help="died at least this long ago (30s, 10m, 2h, 7d)")
        sp.add_argument("--newer-than", help="died at most this long ago")
        sp.add_argument("--redis-url")

    ls = dq.add_parser("list", help="list dead letters")
    filters(ls)
    ls.add_argument("--limit", type=int)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=dlq.dlq_list)

    sh = dq.add_parser("show", help="one dead letter with its whole history")
    sh.add_argument("id")
    sh.add_argument("--topic")
    sh.add_argument("--group")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("--redis-url")
    sh.set_defaults(fn=dlq.dlq_show)

    for name, text in (("reprocess", "move dead letters back to their group's queue"), ("purge", "delete them")):
        mv = dq.add_parser(name, help=text)
        mv.add_argument("ids", nargs="*", help="dead-letter ids (or use filters / --all)")
        filters(mv)
        mv.add_argument("--all", action="store_true", help="every dead letter (with the other filters, if any)")
        mv.add_argument("--from-file", help="the dead letters listed in a `dlq export` JSON Lines file")
        mv.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        if name == "reprocess":
            mv.add_argument("--rate", type=float, help="at most this many messages per second")
        else:
            mv.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        mv.set_defaults(fn=dlq.dlq_move)

    ex = dq.add_parser("export", help="write dead letters as JSON Lines")
    filters(ex)
    ex.add_argument("--out", help="file (default stdout)")
    ex.set_defaults(fn=dlq.dlq_export)

    xp = sub.add_parser("export", help="write pending messages and dead letters as JSON Lines (backup, migration)")
    xp.add_argument("--topic", action="append", help="only this topic (repeat for more; default: every topic)")
    xp.add_argument("--out", help="file, or - for stdout (the default)")
    xp.add_argument("--redis-url")
    xp.set_defaults(fn=transfer.export)

    im = sub.add_parser("import", help="load a `broker export` file; importing it again changes nothing")
    im.add_argument("file", help="the export file ('-': stdin)")
    im.add_argument("--dry-run", action="store_true", help="say what would be imported, change nothing")
    im.add_argument("--ledger-ttl", default="7d", help="how long the import ledger remembers what it wrote (7d)")
    im.add_argument("--redis-url")
    im.set_defaults(fn=transfer.import_)
    _name_parsers(p)
    return p


def _name_parsers(parser: argparse.ArgumentParser) -> None:
    """Each sub-command's parser is stored in its namespace (``_parser``), to report a mistake with its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.set_defaults(_parser=sp)
                _name_parsers(sp)


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
        print(f"error: {e or type(e).__name__}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # a bug: one line, and the traceback on request
        if os.environ.get(ENV_DEBUG):
            raise
        print(f"internal error: {type(e).__name__}: {e} (set {ENV_DEBUG}=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
