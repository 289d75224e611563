"""The environment is the lock: every package of requirements/lock.txt is installed at its pinned version.

Given a venv made by scripts/bootstrap.sh (what `make test` and CI use)
When the installed distributions are read
Then each pinned name is installed at exactly the pinned version, so a run never tests releases nobody chose.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[_normalise(m.group(1))] = m.group(2)
    return pins


def test_the_lock_pins_every_direct_dependency_with_hashes() -> None:
    pins = _pins()
    text = LOCK.read_text()
    for name in ("websockets", "redis", "tenacity", "pybreaker", "structlog", "pytest-asyncio", "fakeredis", "mypy"):
        assert name in pins, name
    assert text.count("==") == len(pins)
    assert text.count("--hash=sha256:") >= len(pins)


def test_installed_versions_are_the_locked_ones() -> None:
    installed = {_normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (pin, installed.get(name)) for name, pin in _pins().items() if installed.get(name) != pin}
    assert not wrong, f"installed differs from requirements/lock.txt (pin, installed): {wrong}"
