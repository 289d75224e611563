"""Mission-critical tests: real redis-server and real broker processes only (no fakes), faults by kill/restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r
