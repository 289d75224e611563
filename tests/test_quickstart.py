"""The README's quickstart, as a person types it: `broker consume` in one terminal, `broker publish` (an argument, then
stdin) in another, against a real broker; and the open-mode warning that `broker serve` prints without tokens.

Given a broker on a real redis-server in open mode
When `broker consume orders --group workers --count 2` runs and the two quickstart publishes are made from the shell
Then the consumer prints the two messages as JSON lines, acks them and exits 0; each publish prints its id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson

from tests.brokers import ROOT, BrokerProcess


def cli(broker: BrokerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args, "--url", broker.url],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def test_readme_quickstart_publish_and_consume(broker: BrokerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    consumer = subprocess.Popen(
        [sys.executable, "-m", "broker", "consume", "orders", "--group", "workers", "--count", "2",
         "--timeout", "30", "--url", broker.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        # the consumer's group must exist before the first publish (every group gets what is published after it)
        deadline = time.monotonic() + 20
        while '"subscribed"' not in broker.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = cli(broker, "publish", "orders", '{"id": 17, "total": 9.5}')
        second = cli(broker, "publish", "orders", "-", stdin='{"id": 18}\n')
        assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
        ids = [orjson.loads(p.stdout)["id"] for p in (first, second)]
        out, err = consumer.communicate(timeout=60)
    finally:
        consumer.kill()
    assert consumer.returncode == 0, err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [(m["id"], m["payload"], m["group"], m["attempt"]) for m in lines] == [
        (ids[0], {"id": 17, "total": 9.5}, "workers", 1),
        (ids[1], {"id": 18}, "workers", 1),
    ]
    assert "Traceback" not in err


def test_open_mode_says_so_at_startup(broker: BrokerProcess) -> None:
    events = [orjson.loads(line) for line in broker.log_text().splitlines() if line.startswith("{")]
    warning = [e for e in events if e["event"] == "auth_open_mode"]
    assert warning and warning[0]["level"] == "warning", events[:5]
    assert "anyone" in str(warning[0]["message"])
