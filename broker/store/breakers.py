"""One circuit breaker per Redis Cluster master (``redis.cluster``), so a failing master pauses only its topics.

A breaker is made for a master (keyed by its ``host:port``) the first time a call is routed to it, from the node's
Redis breaker (``Breaker.like``: same thresholds and listener), named ``redis@<host:port>`` in logs, metrics, the
node's status and ``/readyz``. A replica promoted to master is a new master: it gets a breaker of its own when its
first call is routed to it. While open, a breaker's probe ``PING``s its master (outside the breaker) and half-opens
it at the first answer, like the node's breaker on a single Redis.

Which calls go through which breaker (``scripts.Scripts``): every script call is routed by its topic's slot, so a
batch over many topics is split per master, each part behind that master's breaker; the calls of a master whose
breaker is open, or that failed, come back as ``UnavailableError`` values in their places. Calls that are for no one
master run behind no breaker (``resilience.Unguarded``, see there).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerState

PREFIX = "redis@"


class MasterBreakers:
    def __init__(self, template: Breaker, probe: Callable[[str], Awaitable[object]]) -> None:
        """``template``: the breaker whose settings and listener each master's breaker takes; ``probe(master)``: one
        ``PING`` to that master outside any breaker."""
        self._template = template
        self._probe = probe
        self.by_master: dict[str, Breaker] = {}

    def of(self, master: str) -> Breaker:
        """The breaker of ``master`` (``host:port``), made on first use."""
        b = self.by_master.get(master)
        if b is None:
            b = self.by_master[master] = self._template.like(PREFIX + master, probe=lambda: self._probe(master))
            metrics.breaker_state.labels(b.name).set(0)
        return b

    def states(self) -> dict[str, BreakerState]:
        """Every master's breaker state, by master."""
        return {m: b.state for m, b in self.by_master.items()}

    def not_closed(self, masters: set[str] | None = None) -> dict[str, BreakerState]:
        """The masters whose breaker is open or half-open. With ``masters`` (the masters the cluster has now), the
        breakers of masters that are gone (failed over and not back as masters) are forgotten first: nothing is
        routed to them any more, so their state says nothing."""
        if masters is not None:
            for gone in set(self.by_master) - masters:
                if self.by_master[gone].state is not BreakerState.CLOSED:
                    self.by_master.pop(gone).stop_probe()
        return {m: s for m, s in self.states().items() if s is not BreakerState.CLOSED}

    async def close(self) -> None:
        """Stop every probe (shutdown)."""
        for b in self.by_master.values():
            await b.close()
