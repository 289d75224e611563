"""The store's own tests, run a third time: on a real 3-master Redis Cluster (``redis.cluster = true``), beside
fakeredis and a single redis-server. Imported here with the ``backend`` fixture fixed to ``cluster``, so a change
that works on one Redis but not across masters (a key outside its topic's slot, a command the cluster client routes
elsewhere) fails here."""

from __future__ import annotations

import pytest

from .test_dlq import *  # noqa: F403
from .test_export_snapshot import *  # noqa: F403
from .test_key_order import *  # noqa: F403
from .test_lua_schema import *  # noqa: F403
from .test_store import *  # noqa: F403


@pytest.fixture
def backend() -> str:
    return "cluster"
