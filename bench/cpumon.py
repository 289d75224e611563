"""CPU seconds used by each process on the machine over a window (start-up included), read from /proc: for A/B
runs, where throughput alone is too noisy on a shared machine.

Usage: ``python -m bench.cpumon SECONDS`` prints the busiest processes, most CPU first, one per line:
``<cpu seconds>s <pid> <command line>``. A process that ends inside the window is counted up to its end.
"""

from __future__ import annotations

import os
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        out[int(name)] = (cmd, (int(fields[11]) + int(fields[12])) / TICKS)
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
