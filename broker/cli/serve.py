"""``broker serve``: run a broker node until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from broker.cli.common import settings
from broker.cli.exits import EXIT_OK


async def serve(args: argparse.Namespace) -> int:
    from broker.console import mount
    from broker.node.app import Broker
    from broker.runtime.logs import configure

    s = settings(args)
    configure(s.log.level, s.log.format)
    await Broker(s, console=mount).run_until_signalled()
    return EXIT_OK
