"""``broker diagnose`` as library code: the checks of the Redis a broker uses (``broker.store.diagnose``), their
safe repairs, and the verdict an operator acts on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.store import RedisStore
from broker.store.diagnose import Finding, diagnose

__all__ = ["Finding", "Report", "check"]


@dataclass(frozen=True)
class Report:
    findings: list[Finding]

    @property
    def unrepaired(self) -> list[Finding]:
        """What is still wrong: findings that no repair fixed (all of them without ``repair``)."""
        return [f for f in self.findings if not f.repaired]

    def to_json(self) -> list[dict[str, Any]]:
        return [vars(f) for f in self.findings]


async def check(store: RedisStore, *, repair: bool = False) -> Report:
    """Run every check; with ``repair``, fix what is safe to fix (each finding says what was done)."""
    return Report(await diagnose(store, repair=repair))
