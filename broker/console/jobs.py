"""Reprocess and purge started from the console run as jobs in the node (``ops.dlq.reprocess`` / ``purge``, the
code behind ``broker dlq``): a paced reprocess may take minutes, longer than an HTTP answer may. The page follows a
job by its id. One job at a time per node: a second is refused while one runs (the page says which)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.ops import dlq as dlq_ops
from broker.runtime import metrics
from broker.store import RedisStore
from broker.store.dead_letters import DeadLetter

log = structlog.get_logger("broker.console")

KEEP = 20  # finished jobs remembered (the newest)


@dataclass
class Job:
    id: str
    verb: str  # "reprocess" or "purge"
    total: int
    rate: float | None
    principal: str
    what: str  # the selection, as the operator gave it (for the page and the log)
    unknown: list[str]  # ids named that matched no dead letter
    started_at: float = field(default_factory=time.time)
    done: int = 0
    moved: int = 0
    missing: list[str] = field(default_factory=list)  # gone before they could be moved (another operator, expiry)
    state: str = "running"  # running, done, failed, cancelled
    error: str = ""
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "verb": self.verb, "total": self.total, "rate": self.rate, "principal": self.principal,
            "what": self.what, "unknown": self.unknown, "started_at": self.started_at, "done": self.done,
            "moved": self.moved, "missing": self.missing, "state": self.state, "error": self.error,
            "finished_at": self.finished_at,
        }  # fmt: skip


class Jobs:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.count = 0

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def start(self, verb: str, letters: Sequence[DeadLetter], rate: float | None, principal: str, what: str,
              unknown: list[str]) -> Job:  # fmt: skip
        self.count += 1
        job = Job(f"{self.count}-{int(time.time())}", verb, len(letters), rate, principal, what, unknown)
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP:
            oldest = next(iter(self.jobs))
            if self.jobs[oldest].state == "running":
                break
            del self.jobs[oldest]
        log.info("console_job_started", job=job.id, verb=verb, total=job.total, rate=rate, principal=principal,
                 selection=what)  # fmt: skip
        self.tasks[job.id] = asyncio.create_task(self._run(job, letters), name=f"console_{verb}_{job.id}")
        return job

    async def _run(self, job: Job, letters: Sequence[DeadLetter]) -> None:
        def progress(done: int, _total: int) -> None:
            job.done = done

        try:
            if job.verb == "reprocess":
                job.moved, job.missing = await dlq_ops.reprocess(self.store, letters, job.rate, progress)
            else:
                job.moved, job.missing = await dlq_ops.purge(self.store, letters, progress)
            job.state = "done"
            log.info("console_job_done", job=job.id, verb=job.verb, moved=job.moved, missing=len(job.missing))
        except asyncio.CancelledError:
            job.state, job.error = "cancelled", f"cancelled after {job.done} of {job.total}"
            log.warning("console_job_cancelled", job=job.id, verb=job.verb, done=job.done, total=job.total)
            raise
        except Exception as e:  # Redis down, a script error: the job says so, the log has it; nothing else stops
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            metrics.loop_errors.labels("console_job").inc()
            log.error("console_job_failed", job=job.id, verb=job.verb, done=job.done, error=job.error)
        finally:
            job.finished_at = time.time()
            self.tasks.pop(job.id, None)

    def cancel(self, job_id: str) -> bool:
        task = self.tasks.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
