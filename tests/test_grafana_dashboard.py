"""docs/grafana-dashboard.json is built on the metrics the broker registers: every query names only existing
metrics (a histogram through its _bucket/_sum/_count series), with labels each metric has, and every panel shows
something. A renamed metric or label fails here, not on an operator's empty graph."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from broker.runtime import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# labels Prometheus adds when it scrapes, and the histogram's bucket bound
SCRAPE_LABELS = {"instance", "job", "le"}


def registered() -> dict[str, tuple[str, set[str]]]:
    """Served series name -> (metric type, its labels)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for collector in list(metrics.REGISTRY._collector_to_names):
        for m in collector.describe():
            labels = set(getattr(collector, "_labelnames", ()))
            name = f"{m.name}_total" if m.type == "counter" else m.name
            out[name] = (m.type, labels)
            if m.type == "histogram":
                for suffix in HISTOGRAM_SERIES:
                    out[m.name + suffix] = (m.type, labels)
    return out


def queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                yield v["query"]
            else:
                yield from queries(v)
    elif isinstance(node, list):
        for v in node:
            yield from queries(v)


def test_every_query_names_registered_metrics_and_their_labels() -> None:
    dash = orjson.loads(DASHBOARD.read_bytes())
    known = registered()
    found = list(queries(dash))
    assert len(found) >= 20, found
    used: set[str] = set()
    for q in found:
        names = re.findall(r"\bbroker_[a-z_]+\b", q)
        assert names, f"a query that names no broker metric: {q}"
        for name in names:
            assert name in known, f"{name} (in {q!r}) is not a metric the broker registers"
            used.add(name)
        # labels in selectors {a="x"} and in by (...) clauses must exist on every metric of the query
        labels = set(re.findall(r"(\w+)\s*=~?\s*\"", q))
        for group in re.findall(r"by \(([^)]*)\)", q):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        for name in names:
            missing = labels - known[name][1] - SCRAPE_LABELS
            assert not missing, f"{q!r}: {name} has no label {sorted(missing)} (it has {sorted(known[name][1])})"
    # the dashboard shows the core of the operations doc: traffic, backlog, latency, breakers, loops
    for core in ("broker_published_total", "broker_queue_depth", "broker_publish_to_ack_seconds_bucket",
                 "broker_breaker_state", "broker_loops_unhealthy", "broker_redis_call_seconds_bucket"):  # fmt: skip
        assert core in used, core


def test_every_panel_has_a_query_and_the_dashboard_imports() -> None:
    dash = orjson.loads(DASHBOARD.read_bytes())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
