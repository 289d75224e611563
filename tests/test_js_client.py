"""The JavaScript client (``broker/client/js``): served by the broker at ``/client/``, packaged with the wheel and as
an npm package, and its own ``node --test`` suite run against a real broker and redis-server.

Given a broker process, when a browser asks for ``/client/broker.js``, then it gets the file's bytes as
``text/javascript`` with an ETag it can revalidate (304); any other name, and any path that tries to leave the
folder, is a 404. When Node is installed (CI machines have Node 20 and npm), the client's suite runs as one
subprocess and fails with its output; ``npm pack`` gives a tarball that installs and imports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.node.server import ClientFiles

from .brokers import BrokerProcess
from .support import RedisServer

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "broker" / "client" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NO_NODE = "node is not installed: the JavaScript client's own suite cannot run here (CI machines have Node 20)"


@pytest.fixture(scope="module")
def served(redis: RedisServer) -> Iterator[BrokerProcess]:
    with BrokerProcess(redis.url) as b:
        yield b


def raw_get(port: int, target: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET with the request target sent exactly as given (no client-side path normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def test_the_broker_serves_the_client_files(served: BrokerProcess) -> None:
    for name, ctype in (("broker.js", "text/javascript"), ("broker.d.ts", "application/typescript")):
        status, headers, body = raw_get(served.port, f"/client/{name}")
        assert status == 200
        assert headers["content-type"].startswith(ctype)
        assert body == (JS / name).read_bytes()
        assert headers["cache-control"] == "no-cache"
        etag = headers["etag"]
        status, headers, body = raw_get(served.port, f"/client/{name}?v=2", f"If-None-Match: W/{etag}\r\n")
        assert (status, body, headers["etag"]) == (304, b"", etag)
        assert raw_get(served.port, f"/client/{name}", 'If-None-Match: "other"\r\n')[0] == 200


@pytest.mark.parametrize(
    "target",
    [
        "/client/",
        "/client/nope.js",
        "/client/package.json",
        "/client/../client/js/broker.js",
        "/client/..%2fjs%2fbroker.js",
        "/client/%2e%2e/%2e%2e/pyproject.toml",
        "/client/js/broker.js",
        "/client//etc/passwd",
        "/client/broker.js/",
    ],
)
def test_unknown_names_and_path_traversal_are_404(served: BrokerProcess, target: str) -> None:
    status, headers, body = raw_get(served.port, target)
    assert status == 404, (target, body[:200])
    assert headers["content-type"] == "application/json"
    assert b"not_found" in body


def test_a_missing_file_is_404_not_a_crash(tmp_path: Path) -> None:
    files = ClientFiles(tmp_path)  # an install without the client's files
    assert files.response("broker.js", None).status_code == 404


def test_the_wheel_carries_the_served_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["broker"]
    for name in ClientFiles.TYPES:
        assert f"client/js/{name}" in data


def _node_env() -> dict[str, str]:
    return {**os.environ, "BROKER_PYTHON": sys.executable, "NODE_OPTIONS": ""}


@pytest.mark.skipif(NODE is None, reason=NO_NODE)
def test_the_javascript_client_suite() -> None:
    """``node --test`` of broker/client/js/test: publish/consume/ack, nack, batches, typed errors, pull, status,
    tokens, and reconnect across a broker kill -9 (it starts its own redis-server and broker processes)."""
    assert (JS / "node_modules" / "ws").is_dir(), "run `npm ci` in broker/client/js (scripts/bootstrap.sh does)"
    # its own process group: on a timeout the redis-server and broker it started go with it
    proc = subprocess.Popen(
        [str(NODE), "--test", "--test-reporter=spec", "test/broker.test.js"],
        cwd=JS, env=_node_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"node --test did not finish in 240 s:\n{stdout[-20000:]}\n{stderr}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print(done.stdout[-3000:])
    assert done.returncode == 0, f"node --test failed ({done.returncode}):\n{done.stdout[-20000:]}\n{done.stderr}"


@pytest.mark.skipif(NPM is None, reason=NO_NODE)
def test_npm_pack_gives_an_installable_package(tmp_path: Path) -> None:
    assert NPM is not None and NODE is not None
    packed = subprocess.run(
        [NPM, "pack", "--pack-destination", str(tmp_path)], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert packed.returncode == 0, packed.stderr
    tarball = tmp_path / packed.stdout.strip().splitlines()[-1]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "version": "1.0.0", "type": "module"}')
    installed = subprocess.run(
        [NPM, "install", "--offline", "--no-audit", "--no-fund", str(tarball)],
        cwd=app, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    files = sorted(p.name for p in (app / "node_modules" / "redis-ws-broker").iterdir())
    assert files == ["README.md", "broker.d.ts", "broker.js", "package.json"]
    probe = "import { connect, BrokerError as E } from 'redis-ws-broker'; console.log(typeof connect, new E().code)"
    ran = subprocess.run(
        [NODE, "--input-type=module", "-e", probe], cwd=app, capture_output=True, text=True, timeout=60
    )
    assert ran.stdout.strip() == "function internal", ran.stderr
