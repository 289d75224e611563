"""The library code behind the operator commands, called directly (the CLI tests run the same code end to end):
stats snapshots and rates, the dead-letter selection an operator writes, the diagnose verdict."""

from __future__ import annotations

import pytest

from broker.core.records import LineError
from broker.ops import stats
from broker.ops.diagnose import Finding, Report
from broker.ops.dlq import Filter
from broker.ops.dlq_select import ids_from_export, make_filter, unknown_ids
from broker.ops.message import detail_columns
from broker.store import RedisStore
from broker.store.dead_letters import DeadLetter


def row(topic: str, group: str, **counts: int) -> stats.Row:
    return {"topic": topic, "group": group, **{w: counts.get(w, 0) for w in stats.RATED}}


def test_rates_are_the_counter_differences_per_second() -> None:
    # Given a snapshot, and one taken 2 s later in which a node restarted (its `nacked` total went down)
    before = stats.by_pair([row("t", "g", published=10, delivered=4, acked=2, nacked=5)])
    rows = [row("t", "g", published=30, delivered=8, acked=2, nacked=1), row("t", "new")]
    # When rates are added
    stats.add_rates(rows, before, 2.0)
    # Then each counter's rate is its rise per second, a fall is no change, and a new pair has none yet
    assert {k: v for k, v in rows[0].items() if k.endswith("_per_s")} == {
        "published_per_s": 10.0, "delivered_per_s": 2.0, "acked_per_s": 0.0, "nacked_per_s": 0.0,
    }  # fmt: skip
    assert all(rows[1][f"{w}_per_s"] is None for w in stats.RATED)


def test_by_pair_copies_so_later_rates_do_not_change_the_earlier_snapshot() -> None:
    rows = [row("t", "g", acked=1)]
    before = stats.by_pair(rows)
    stats.add_rates(rows, before, 1.0)
    assert "acked_per_s" not in before[("t", "g")]


async def test_a_snapshot_of_an_empty_store(store: RedisStore) -> None:
    snap = await stats.collect(store, memory=True)
    assert snap == stats.Stats(groups=[], nodes=[], topics=[], broken=[])


def test_a_filter_from_what_an_operator_types() -> None:
    f = make_filter("t", None, "timeout", "10m", "2h", ["a"])
    assert f == Filter("t", None, "timeout", 600_000, 7_200_000, frozenset({"a"}))
    assert make_filter().is_empty()
    with pytest.raises(ValueError, match="bad duration '10 minutes'"):
        make_filter(older_than="10 minutes")


def test_ids_from_a_dlq_export_file() -> None:
    assert ids_from_export(b'{"id": "a", "topic": "t"}\n\n{"id": "b"}\n') == {"a", "b"}
    assert ids_from_export(b"") == frozenset()
    with pytest.raises(LineError) as e:
        ids_from_export(b'{"id": "a"}\n{"topic": "t"}\n')
    assert (e.value.line, e.value.message) == (2, "expected a dead letter object with an 'id'")


def test_named_ids_that_matched_nothing() -> None:
    found = [DeadLetter("b", "t", "g", "1", "{}", 0, 3, [], "max_attempts", 0, 60)]
    assert unknown_ids(Filter(ids=frozenset({"c", "a", "b"})), found) == ["a", "c"]
    assert unknown_ids(Filter(topic="t"), found) == []


def test_diagnose_is_wrong_while_a_finding_is_unrepaired() -> None:
    fixed = Finding("error", "stale_lease", "a lease is past its deadline", "sweep", repaired="swept 1")
    open_ = Finding("warning", "persistence", "no AOF", "appendonly yes")
    assert Report([fixed]).unrepaired == []
    assert Report([fixed, open_]).unrepaired == [open_]
    assert Report([open_]).to_json() == [vars(open_)]


def test_message_status_columns_after_topic_group_state() -> None:
    rows = [
        {"topic": "t", "group": "a", "state": "leased", "attempts": 1, "until": 5},
        {"topic": "t", "group": "b", "state": "dead", "attempts": 3, "reason": "x"},
    ]
    assert detail_columns(rows) == ["attempts", "reason", "until"]
