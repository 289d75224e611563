"""TLS: the broker serves wss:// (and https:// for its HTTP endpoints) with a certificate from config; a plain
ws:// client cannot talk to it. Uses a throwaway self-signed certificate made with the openssl CLI."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import websockets

from broker.client.client import BrokerClient

from .brokers import BrokerProcess
from .support import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a cert")


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_handshake_and_messages(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    env = {"BROKER_SERVER_TLS_CERT_FILE": str(cert), "BROKER_SERVER_TLS_KEY_FILE": str(key)}
    with RedisServer() as redis, BrokerProcess(redis.url, env=env, tls=trust) as broker:
        # Given a broker serving TLS, When a client connects over wss:// trusting the certificate
        async with websockets.connect(broker.url, ssl=trust) as ws:
            await ws.send('{"op":"ping","ref":1}')
            assert await ws.recv() == '{"op":"pong","ref":1}'
        # Then the HTTP endpoints answer over https too
        assert broker.get("/healthz")[0] == 200
        # And a plain ws:// client is not served
        with pytest.raises((OSError, websockets.InvalidHandshake, websockets.InvalidMessage, TimeoutError)):
            async with websockets.connect(f"ws://127.0.0.1:{broker.port}/", open_timeout=3):
                pass
        # And a client that does not trust the certificate is refused by its own TLS check
        with pytest.raises(ssl.SSLCertVerificationError):
            async with websockets.connect(broker.url, ssl=ssl.create_default_context()):
                pass
    assert redis is not None


async def test_unloadable_certificate_stops_startup(tmp_path: Path) -> None:
    bad = tmp_path / "nope.pem"
    bad.write_text("not a certificate")
    env = {"BROKER_SERVER_TLS_CERT_FILE": str(bad), "BROKER_SERVER_TLS_KEY_FILE": str(bad)}
    with RedisServer() as redis:
        b = BrokerProcess(redis.url, env=env)
        with pytest.raises(RuntimeError, match="cannot load TLS certificate"):
            b.start()
        b.close()


async def test_client_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    env = {"BROKER_SERVER_TLS_CERT_FILE": str(cert), "BROKER_SERVER_TLS_KEY_FILE": str(key)}
    with RedisServer() as redis, BrokerProcess(redis.url, env=env, tls=trust) as broker:
        async with BrokerClient(broker.url, ssl=trust) as c:
            sub = await c.subscribe("secure")
            await c.publish("secure", {"x": 1})
            m = await sub.get(timeout=5)
            assert m.payload == {"x": 1}
            await m.ack(wait=True)
