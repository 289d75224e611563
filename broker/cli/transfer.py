"""``broker export`` and ``broker import`` (docs/export.md): the library code is ``broker.ops.transfer``."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from broker.cli.common import UsageError, more, progress, read_input, store, write_output
from broker.cli.exits import EXIT_OK
from broker.core import records as export_format
from broker.core.records import LineError
from broker.ops import transfer
from broker.ops.dlq import parse_duration_ms


async def export(args: argparse.Namespace) -> int:
    """Pending messages, dead letters and idempotency keys of the chosen topics as JSON Lines (docs/export.md)."""
    async with store(args) as s:
        f, missing = await transfer.export(s, args.topic or ())
    await write_output(args.out, export_format.encode(f))
    if missing:
        print(f"left out {len(missing)} queue entr(y/ies) whose body was gone (acked meanwhile, or see `broker "
              f"diagnose`): {more(missing)}", file=sys.stderr)  # fmt: skip
    c = f.counts()
    print(f"exported {c['message']} message(s), {c['dead']} dead letter(s), {c['idempotency']} idempotency key(s) "
          f"of {c['topic']} topic(s)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


async def import_(args: argparse.Namespace) -> int:
    """Load an export, idempotently. The whole file is checked first: a bad line is named and nothing is written."""
    try:
        ledger_ttl_ms = parse_duration_ms(args.ledger_ttl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        f = export_format.parse(await asyncio.to_thread(read_input, args.file))
    except LineError as e:
        raise UsageError(f"{args.file}:{e.line}: {e.message}; nothing imported") from None
    try:
        async with store(args) as s:
            if f.header.prefix != s.prefix:
                print(f"note: exported under key prefix {f.header.prefix!r}, importing under {s.prefix!r}",
                      file=sys.stderr)  # fmt: skip
            shown = progress("import") if len(f.messages) + len(f.dead) > 1000 else None
            summary = await transfer.import_file(s, f, dry_run=args.dry_run, ledger_ttl_ms=ledger_ttl_ms,
                                                 progress=shown)  # fmt: skip
    except LineError as e:
        raise UsageError(f"{args.file}:{e.line}: {e.message}; nothing imported") from None
    print(orjson.dumps(summary.to_json()).decode())
    print(summary.text(), file=sys.stderr)
    return EXIT_OK
