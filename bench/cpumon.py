"""CPU seconds and memory of processes, read from /proc.

Used two ways:

- inside a scenario: ``CpuMeter({"server": [pid], "redis": [pid]})`` reads utime + stime of the server processes
  (``/proc/<pid>/stat``, every thread of a process included) at the start and at the end of the timed part, so a
  scenario can report the servers' CPU per message; ``find_pids`` finds system services (NATS, RabbitMQ) by process
  name, ``rss_bytes`` reads a process's resident set (``/proc/<pid>/statm``);
- from the shell, for A/B runs: ``python -m bench.cpumon SECONDS`` prints the busiest processes over a window, most
  CPU first, one per line: ``<cpu seconds>s <pid> <command line>``. A process that ends inside the window is counted
  up to its end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def find_pids(names: Iterable[str]) -> list[int]:
    """Pids of every process whose name (``/proc/<pid>/comm``) is one of ``names``: e.g. ``nats-server``, or
    ``beam.smp`` and its helpers for RabbitMQ."""
    wanted = set(names)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() in wanted:
                    out.append(int(entry))
        except OSError:
            continue
    return sorted(out)


class CpuMeter:
    """CPU seconds used by groups of processes between ``start()`` and ``stop()``.

    ``roles`` maps a role (``"server"``: the broker, relay, nats-server, RabbitMQ; ``"redis"``: a redis-server) to
    its pids. A process that ends meanwhile counts up to its last reading."""

    def __init__(self, roles: Mapping[str, Iterable[int]]) -> None:
        self.roles = {role: list(pids) for role, pids in roles.items() if pids}  # a role with no process: none
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self.seconds: dict[str, float] = {}
        self.wall_s = 0.0
        self._t0 = 0.0

    def _read(self) -> dict[int, float]:
        out = {}
        for pids in self.roles.values():
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    out[pid] = cpu
        return out

    def start(self) -> None:
        self._start = self._read()
        self._last = dict(self._start)
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        self.wall_s = time.perf_counter() - self._t0
        self._last.update(self._read())
        self.seconds = {
            role: sum(self._last.get(pid, 0.0) - self._start.get(pid, 0.0) for pid in pids if pid in self._start)
            for role, pids in self.roles.items()
        }
        return self.seconds


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
        except OSError:
            continue  # gone meanwhile
        cpu = cpu_seconds(int(name))
        if cpu is not None:
            out[int(name)] = (cmd, cpu)
    return out


def measure(window_s: float, step_s: float = 0.2) -> list[tuple[float, int, str]]:
    first = snapshot()
    seen = dict(first)
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        time.sleep(step_s)
        for pid, (cmd, cpu) in snapshot().items():
            old = seen.get(pid)
            seen[pid] = (cmd if cmd or old is None else old[0], cpu)  # an exited process loses its cmdline
    used = [(cpu - first.get(pid, (cmd, 0.0))[1], pid, cmd) for pid, (cmd, cpu) in seen.items()]
    return sorted((u for u in used if u[0] > 0.05), reverse=True)


def main() -> None:
    for cpu, pid, cmd in measure(float(sys.argv[1]))[:10]:
        print(f"{cpu:6.2f}s {pid} {cmd}")


if __name__ == "__main__":
    main()
