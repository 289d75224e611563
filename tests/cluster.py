"""A throwaway Redis Cluster for tests: ``scripts/redis-cluster.sh`` (3 masters + 3 replicas) on a free base port in
a temp dir, stopped and removed at the end.

Six consecutive ports are needed, and each node's cluster bus port (+10000): a random base is tried until all twelve
bind. Every wait is bounded; a cluster that does not form raises with the script's output.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from broker.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "redis-cluster.sh"
NODES = 6


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(tries: int = 50) -> int:
    """A base port whose 6 ports and their bus ports (+10000) were free a moment ago."""
    for _ in range(tries):
        base = random.randrange(20_000, 30_000)
        if all(_free(base + i) and _free(base + i + 10_000) for i in range(NODES)):
            return base
    raise RuntimeError("no 6 consecutive free ports (and bus ports) found for a test cluster")


class RedisCluster:
    """``with RedisCluster() as c:`` ``c.url`` is a seed node; ``c.settings()`` the broker settings to use it."""

    def __init__(self, node_timeout_ms: int = 1_000) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli are not on PATH")
        self.base = free_base_port()
        self.dir = Path(tempfile.mkdtemp(prefix="broker-cluster-"))
        self.env = {
            **os.environ,
            "REDIS_CLUSTER_PORT": str(self.base),
            "REDIS_CLUSTER_DIR": str(self.dir),
            "REDIS_CLUSTER_NODE_TIMEOUT_MS": str(node_timeout_ms),
        }
        self._run("start", timeout_s=60)

    @property
    def ports(self) -> list[int]:
        return [self.base + i for i in range(NODES)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.base}"

    def settings(self, settings: Settings | None = None) -> Settings:
        return (settings or Settings()).replace("redis", url=self.url, cluster=True)

    def _run(self, verb: str, timeout_s: float = 30) -> str:
        p = subprocess.run(
            ["bash", str(SCRIPT), verb], env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if p.returncode != 0:
            raise RuntimeError(f"redis-cluster.sh {verb} exited {p.returncode}: {p.stdout}\n{p.stderr}")
        return p.stdout

    def cli(self, port: int, *args: str, timeout_s: float = 10) -> str:
        p = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return p.stdout.strip()

    def nodes(self) -> list[tuple[int, str, str]]:
        """(port, role, master id or '-') of every node, as the first node that answers sees them."""
        for port in self.ports:
            out = self.cli(port, "CLUSTER", "NODES")
            if out:
                rows = []
                for line in out.splitlines():
                    f = line.split()
                    flags = f[2].split(",")
                    role = "fail" if "fail" in flags else "master" if "master" in flags else "slave"
                    rows.append((int(f[1].split("@")[0].rsplit(":", 1)[1]), role, f[3]))
                return rows
        raise RuntimeError("no cluster node answers CLUSTER NODES")

    def masters(self) -> list[int]:
        return sorted(p for p, role, _ in self.nodes() if role == "master")

    def port_of_slot_owner(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = int(self.cli(self.ports[0], "CLUSTER", "KEYSLOT", key))
        for port in self.masters():
            if self._serves(port, slot):
                return port
        raise RuntimeError(f"no master serves slot {slot}")

    def _serves(self, port: int, slot: int) -> bool:
        for line in self.cli(port, "CLUSTER", "NODES").splitlines():
            f = line.split()
            if "myself" in f[2]:
                for r in f[8:]:
                    if r.startswith("["):
                        continue
                    lo, _, hi = r.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        return True
        return False

    def pid(self, port: int) -> int:
        return int((self.dir / str(port) / "redis.pid").read_text().strip())

    def signal(self, port: int, sig: int) -> None:
        os.kill(self.pid(port), sig)

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again (after a kill), with its own data folder and cluster config: it rejoins
        (as a replica when its replica was promoted meanwhile). ``start`` leaves the running nodes alone."""
        self._run("start", timeout_s=60)

    def replica_of(self, master_port: int) -> int:
        master_id = self.cli(master_port, "CLUSTER", "MYID")
        return next(p for p, role, m in self.nodes() if role == "slave" and m == master_id)

    def wait_state_ok(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = [self.cli(p, "CLUSTER", "INFO") for p in self.masters()]
            if ok and all("cluster_state:ok" in x for x in ok):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster state did not become ok")

    def flush(self) -> None:
        for port in self.masters():
            self.cli(port, "FLUSHALL")

    def close(self) -> None:
        try:
            self._run("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def move_slot(
    cluster: RedisCluster, slot: int, src: int, dst: int, batch: int = 10, pause_s: float = 0.005, timeout_s: float = 60
) -> int:
    """Move one slot from the master on port ``src`` to the one on ``dst`` the way ``redis-cli --cluster reshard``
    does: ``SETSLOT IMPORTING`` on the target, ``SETSLOT MIGRATING`` on the source, ``MIGRATE`` of ``batch`` keys at
    a time (reshard's ``--cluster-pipeline``, default 10) until the source holds none, then ``SETSLOT NODE`` on
    target, source and every other master. ``pause_s`` between batches lets traffic meet the half-moved slot.
    Returns the number of keys moved. Bounded by ``timeout_s``."""
    import redis as sync_redis

    conns = {p: sync_redis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p in cluster.masters()}
    try:
        src_id, dst_id = conns[src].execute_command("CLUSTER MYID"), conns[dst].execute_command("CLUSTER MYID")
        conns[dst].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        conns[src].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"slot {slot} still had keys on {src} after {timeout_s} s")
            keys = conns[src].execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            conns[src].execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause_s)
        for p in (dst, src, *(p for p in conns if p not in (src, dst))):
            conns[p].execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved
    finally:
        for c in conns.values():
            c.close()
