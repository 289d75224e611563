"""The store is closed: only ``broker/store`` talks to Redis, and inside it every call goes through the gateway.

Read from the source (``ast``), so a shortcut fails here before it reaches a review: an ``import redis`` outside the
store, a private store helper called from outside, the client taken from a store instead of going through its
gateway."""

from __future__ import annotations

import ast
from pathlib import Path

BROKER = Path(__file__).resolve().parent.parent / "broker"
STORE = BROKER / "store"
# The modules that hold the client: the gateway (every call), the script runner (registers the scripts) and its
# pipe (batches of EVALSHA on one pooled connection, each batch inside a gateway call), the wake-up listener (Pub/Sub,
# outside the breaker by design) and the facade that builds them.
CLIENT_HOLDERS = {"gateway.py", "scripts.py", "pipe.py", "nodes.py", "redis_store.py"}
CLIENT_NAMES = ("redis", "gateway", "scripts")  # a store's ways to its client: for the store's own modules only


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _outside_store() -> list[Path]:
    return [p for p in _modules(BROKER) if STORE not in p.parents]


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _is_store(node: ast.expr) -> bool:
    """``store``, ``self.store``, ``x.store``: an expression that names a store."""
    return (isinstance(node, ast.Name) and node.id == "store") or (
        isinstance(node, ast.Attribute) and node.attr == "store"
    )


def test_nothing_outside_the_store_imports_redis() -> None:
    bad = [
        f"{p.relative_to(BROKER)}: {mod}"
        for p in _outside_store()
        for mod, _ in _imports(ast.parse(p.read_text()))
        if mod.split(".")[0] in ("redis", "fakeredis")
    ]
    assert not bad


def test_nothing_outside_the_store_uses_a_private_store_helper_or_its_client() -> None:
    bad: list[str] = []
    for p in _outside_store():
        tree = ast.parse(p.read_text())
        for mod, names in _imports(tree):
            if mod.startswith("broker.store"):
                bad += [f"{p.relative_to(BROKER)}: imports {mod}.{n}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_store(node.value)):
                continue
            if node.attr.startswith("_") or node.attr in CLIENT_NAMES:
                bad.append(f"{p.relative_to(BROKER)}:{node.lineno}: store.{node.attr}")
    assert not bad


def test_inside_the_store_the_client_is_reached_only_through_the_gateway() -> None:
    bad: list[str] = []
    for p in _modules(STORE):
        if p.name in CLIENT_HOLDERS:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and (
                node.attr == "client" or (node.attr == "redis" and _is_store(node.value))
            ):
                bad.append(f"{p.name}:{node.lineno}: .{node.attr}")
    assert not bad
