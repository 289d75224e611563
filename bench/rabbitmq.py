"""RabbitMQ baselines (``rabbitmq``, ``rabbitmq-s2``, ``rabbitmq-s3``): not built yet.

RabbitMQ runs as a system service on 127.0.0.1:5672 here, but the project pins no AMQP client (aio-pika or
aiormq would be one more development dependency in pyproject.toml and requirements/lock.txt). Until one is added
these scenarios are opt-in and report ``SKIPPED``; the CPU of its processes (``beam.smp`` and helpers) would be
read like NATS's (``bench.scenarios.SERVICE_PROCESSES``).
"""

from __future__ import annotations

from .registry import Context, ScenarioResult, scenario
from .scenarios import S1_TITLE, S2_TITLE, S3_TITLE

RABBIT = "RabbitMQ (durable queue, publisher confirms, manual acks)"


def _skipped(name: str) -> ScenarioResult:
    res = ScenarioResult(name, status="skipped")
    res.note = "baseline skipped: no AMQP client in the project's dependencies (see bench/rabbitmq.py)"
    return res


@scenario(
    "rabbitmq", needs=("rabbitmq",), title=f"{RABBIT}, S1: {S1_TITLE}", system="rabbitmq", shape="s1", default=False
)
async def rabbitmq_s1(ctx: Context) -> ScenarioResult:
    return _skipped("rabbitmq")


@scenario(
    "rabbitmq-s2", needs=("rabbitmq",), title=f"{RABBIT}, S2: {S2_TITLE}", system="rabbitmq", shape="s2", default=False
)
async def rabbitmq_s2(ctx: Context) -> ScenarioResult:
    return _skipped("rabbitmq-s2")


@scenario(
    "rabbitmq-s3", needs=("rabbitmq",), title=f"{RABBIT}, S3: {S3_TITLE}", system="rabbitmq", shape="s3", default=False
)
async def rabbitmq_s3(ctx: Context) -> ScenarioResult:
    return _skipped("rabbitmq-s3")
