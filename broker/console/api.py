"""The console's JSON API and page routes. Every answer is built from the operator library behind the CLI:
``ops.stats`` (``broker stats``), ``ops.dlq`` and ``ops.dlq_select`` (``broker dlq``), ``ops.message`` (``broker
message``). Reads are GETs; reprocess and purge are POSTs that name what they confirm (``confirm=<verb>`` and
``expect=<the count the operator was shown>``): when the selection no longer has that many dead letters, nothing
changes and the answer (409) gives the new count.

Parameters come in the query string, for POSTs too: the node's HTTP parser takes no request body (it is the
WebSocket handshake's), and none of them is a secret (the token is in the ``Authorization`` header)."""

from __future__ import annotations

import http
import time
from typing import Any

import orjson
import structlog

from broker.console.files import PageFiles
from broker.console.jobs import Jobs
from broker.console.live import Rates
from broker.core.errors import BrokerError, NotFoundError, ProtocolError, UnavailableError
from broker.node.console_gate import API, PREFIX, ConsoleAnswer, ConsoleContext, ConsoleRequest
from broker.ops import dlq as dlq_ops
from broker.ops import message as message_ops
from broker.ops import stats as stats_ops
from broker.ops.dlq import Filter
from broker.ops.dlq_select import make_filter, unknown_ids
from broker.store.dead_letters import DeadLetter

log = structlog.get_logger("broker.console")

LIST_LIMIT = 200  # dead letters one browse shows by default
LIST_MAX = 1000
VERBS = ("reprocess", "purge")
FILTER_FIELDS = ("topic", "group", "error", "older_than", "newer_than", "ids")

_STATUS = {NotFoundError: 404, ProtocolError: 400, UnavailableError: 503}


class Conflict(BrokerError):
    code = "conflict"


def _json(obj: object, status: int = 200) -> ConsoleAnswer:
    return ConsoleAnswer(status, orjson.dumps(obj), "application/json")


def _error(e: BrokerError) -> ConsoleAnswer:
    status = 409 if isinstance(e, Conflict) else next((s for c, s in _STATUS.items() if isinstance(e, c)), 500)
    body: dict[str, Any] = {"error": e.code, "message": e.message}
    if e.retry_after_ms is not None:
        body["retry_after_ms"] = e.retry_after_ms
    return _json(body, status)


def _filter(q: dict[str, str]) -> Filter:
    """The CLI's filter flags, as query parameters (``ids`` comma-separated); durations as the CLI takes them."""
    ids = [i.strip() for i in q.get("ids", "").split(",") if i.strip()]
    try:
        return make_filter(q.get("topic") or None, q.get("group") or None, q.get("error") or None,
                           q.get("older_than") or None, q.get("newer_than") or None, ids)  # fmt: skip
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def _described(q: dict[str, str]) -> str:
    """A selection for the page and the log, e.g. ``topic=orders error=timeout``."""
    parts = [f"{k}={q[k]}" for k in FILTER_FIELDS if q.get(k)]
    return " ".join(parts) or ("all" if q.get("all") == "1" else "")


def _summary(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id, "topic": d.topic, "group": d.group, "attempts": d.attempts, "reason": d.reason,
        "died_at": d.died_at, "ttl_s": d.ttl_s, "key": d.key,
        "last_error": str(d.errors[-1].get("error", "")) if d.errors else "",
    }  # fmt: skip


def _int(q: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(q.get(name) or default)
    except ValueError:
        raise ProtocolError(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise ProtocolError(f"{name} must be within {low}..{high}")
    return value


class Console:
    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.files = PageFiles()
        self.rates = Rates()
        self.jobs = Jobs(ctx.store)
        self.gets = {
            "overview": self.overview, "dlq": self.dlq_list, "dlq/show": self.dlq_show,
            "dlq/preview": self.dlq_preview, "dlq/export": self.dlq_export, "message": self.message,
            "jobs": self.job_list,
        }  # fmt: skip

    async def __call__(self, req: ConsoleRequest) -> ConsoleAnswer:
        if not req.path.startswith(API):
            return self.page(req.path)
        route = req.path.removeprefix(API).rstrip("/")
        try:
            if req.method == "POST":
                return await self.post(route, req)
            if route.startswith("jobs/"):
                return self.job(route.removeprefix("jobs/"))
            handler = self.gets.get(route)
            if handler is None:
                raise NotFoundError(f"no such console call {req.path}")
            return await handler(req)
        except BrokerError as e:
            if not isinstance(e, NotFoundError | ProtocolError | Conflict):
                log.warning("console_call_failed", path=req.path, error=e.message, code=e.code)
            return _error(e)

    async def close(self) -> None:
        await self.jobs.close()

    def page(self, path: str) -> ConsoleAnswer:
        if path == PREFIX:  # relative links in the page need the trailing slash
            return ConsoleAnswer(308, b"", "text/plain", (("Location", PREFIX + "/"),))
        answer = self.files.answer(path.removeprefix(PREFIX + "/"))
        return answer if answer is not None else _error(NotFoundError(f"no such file {path}"))

    # ---- reads ------------------------------------------------------------------------------------------------

    async def overview(self, req: ConsoleRequest) -> ConsoleAnswer:
        """One refresh: ``broker stats`` (depths, consumers, oldest ready age, counters and rates, live nodes with
        breakers and reasons), this node's ``/readyz`` and the chart's points. ``server_ms``: the time it took."""
        started = time.perf_counter()
        stats = await stats_ops.collect(self.store)
        self.rates.apply(stats)
        ready, reasons = self.ctx.readiness()
        return _json({
            "node": self.ctx.node_id, "auth_mode": self.ctx.auth_mode, "local_dev": req.local_dev,
            "principal": req.principal.name, "readyz": {"ready": ready, "reasons": reasons},
            "groups": stats.groups, "nodes": stats.nodes, "broken": stats.broken, "chart": list(self.rates.points),
            "job": (j.to_json() if (j := self.jobs.running()) else None),
            "server_ms": round((time.perf_counter() - started) * 1000, 2),
        })  # fmt: skip

    async def dlq_list(self, req: ConsoleRequest) -> ConsoleAnswer:
        """``broker dlq list``: dead letters matching the filter, oldest first per group (at most ``limit``)."""
        limit = _int(req.query, "limit", LIST_LIMIT, 1, LIST_MAX)
        letters = await dlq_ops.select(self.store, _filter(req.query), limit + 1)
        return _json({"letters": [_summary(d) for d in letters[:limit]], "more": len(letters) > limit})

    async def dlq_show(self, req: ConsoleRequest) -> ConsoleAnswer:
        """``broker dlq show ID``: the whole dead letter, every attempt's error."""
        msg_id = req.query.get("id", "")
        if not msg_id:
            raise ProtocolError("id is required")
        f = Filter(req.query.get("topic") or None, req.query.get("group") or None, ids=frozenset([msg_id]))
        letters = await dlq_ops.select(self.store, f)
        if not letters:
            raise NotFoundError(f"no dead letter {msg_id!r} (unknown id, already reprocessed, purged or expired)")
        return _json({"letters": [d.to_json() for d in letters]})

    async def dlq_preview(self, req: ConsoleRequest) -> ConsoleAnswer:
        """How many dead letters a reprocess or purge with this selection would move (``--dry-run``)."""
        f = self._selection(req.query)
        letters = await dlq_ops.select(self.store, f)
        groups: dict[str, int] = {}
        for d in letters:
            groups[f"{d.topic}/{d.group}"] = groups.get(f"{d.topic}/{d.group}", 0) + 1
        return _json({"count": len(letters), "groups": groups, "unknown": unknown_ids(f, letters),
                      "selection": _described(req.query)})  # fmt: skip

    async def dlq_export(self, req: ConsoleRequest) -> ConsoleAnswer:
        """``broker dlq export``'s file (JSON Lines) for the filter, as a download."""
        letters = await dlq_ops.select(self.store, _filter(req.query))
        name = f"dead-letters-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
        return ConsoleAnswer(200, dlq_ops.export_lines(letters), "application/x-ndjson",
                             (("Content-Disposition", f'attachment; filename="{name}"'),))  # fmt: skip

    async def message(self, req: ConsoleRequest) -> ConsoleAnswer:
        """``broker message ID``: one row per (topic, group) that knows the message."""
        msg_id = req.query.get("id", "").strip()
        if not msg_id:
            raise ProtocolError("id is required")
        rows = await message_ops.where(self.store, msg_id, req.query.get("topic") or None)
        columns = [*message_ops.ROW_HEAD, *message_ops.detail_columns(rows)]
        return _json({"id": msg_id, "rows": rows, "columns": columns})

    async def job_list(self, req: ConsoleRequest) -> ConsoleAnswer:
        return _json({"jobs": [j.to_json() for j in reversed(self.jobs.jobs.values())]})

    def job(self, job_id: str) -> ConsoleAnswer:
        job = self.jobs.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} (jobs are kept by the node that ran them, the last 20)")
        return _json(job.to_json())

    # ---- changes ----------------------------------------------------------------------------------------------

    def _selection(self, q: dict[str, str]) -> Filter:
        f = _filter(q)
        if f.is_empty() and q.get("all") != "1":
            raise ProtocolError("name ids, or a filter (topic, group, error, older_than, newer_than), or all=1")
        return f

    async def post(self, route: str, req: ConsoleRequest) -> ConsoleAnswer:
        if route.startswith("jobs/") and route.endswith("/cancel"):
            job_id = route.removeprefix("jobs/").removesuffix("/cancel")
            if not self.jobs.cancel(job_id):
                raise NotFoundError(f"no running job {job_id!r}")
            log.info("console_job_cancel", job=job_id, principal=req.principal.name)
            return _json({"cancelled": job_id})
        verb = route.removeprefix("dlq/")
        if not route.startswith("dlq/") or verb not in VERBS:
            raise NotFoundError(f"no such console call POST {req.path}")
        return await self.move(verb, req)

    async def move(self, verb: str, req: ConsoleRequest) -> ConsoleAnswer:
        q = req.query
        if q.get("confirm") != verb:
            raise ProtocolError(f"a {verb} needs confirm={verb} and expect=<the count of its preview>")
        expect = _int(q, "expect", -1, 0, 10**9)
        rate = None
        if verb == "reprocess" and q.get("rate"):
            try:
                rate = float(q["rate"])
            except ValueError:
                raise ProtocolError("rate must be a number of messages per second") from None
            if not 0 < rate <= 1_000_000:
                raise ProtocolError("rate must be above 0 (messages per second)")
        f = self._selection(q)
        busy = self.jobs.running()
        if busy is not None:
            raise Conflict(f"job {busy.id} ({busy.verb} of {busy.total}) is still running on this node")
        letters = await dlq_ops.select(self.store, f)
        if len(letters) != expect:
            raise Conflict(f"the selection now has {len(letters)} dead letter(s), not {expect}: nothing changed; "
                           f"look at the preview again")  # fmt: skip
        if not letters:
            raise NotFoundError("no dead letters match: nothing changed")
        job = self.jobs.start(verb, letters, rate, req.principal.name, _described(q), unknown_ids(f, letters))
        return _json(job.to_json(), http.HTTPStatus.ACCEPTED.value)
