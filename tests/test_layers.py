"""The layer table, held against every module of ``broker/`` by reading its imports with ``ast``.

Given the layers, lowest first: core (pure) < runtime (asyncio building blocks) < store (Redis) < node < ops < console
(the web console, which the node serves through a handler it is given) < cli,
and the client apart (it runs in the application's process and imports nothing of the server side but the error
table), when every ``import`` in ``broker/`` is read, then no module imports from a layer above its own, only the
store talks to Redis, only ``runtime/resilience.py`` (and the client) imports the retry and breaker libraries, the
core does no I/O, the client takes only the dependencies ``pip install redis-ws-broker`` gives it, nothing outside
its module uses a private helper of another, and no two modules import each other, however indirectly.

Every import counts: at module level, inside a function, or under ``TYPE_CHECKING``. A deferred import hides a
dependency (or a cycle) from Python at start-up; it does not remove it from the design.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "broker"

# The layer table, lowest first: a module may import from its own layer and the layers before it.
LAYERS = ("core", "runtime", "store", "node", "ops", "console", "cli")
# Modules at the package root, and the layer they belong to.
ROOT_MODULES = {"broker": "core", "broker.__main__": "cli"}
# The client is apart: it imports broker.client.* and these, nothing else of broker; only these layers import it.
CLIENT = "client"
CLIENT_MAY_IMPORT = frozenset({"broker.core.errors"})
MAY_IMPORT_CLIENT = frozenset({"cli"})

# Third-party (and stdlib) modules, by top-level name, and the only places allowed to import them.
REDIS = frozenset({"redis", "fakeredis", "hiredis"})  # talking to Redis: the store only
RESILIENCE = frozenset({"pybreaker", "tenacity"})  # breakers and retries: runtime/resilience.py (the client: tenacity)
RESILIENCE_HOME = "broker.runtime.resilience"
CLIENT_MAY_USE_RESILIENCE = frozenset({"tenacity"})
CORE_MUST_NOT_IMPORT = frozenset({"asyncio", "redis", "fakeredis", "hiredis", "websockets"})  # pure: no I/O


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "broker.node.app"
    target: str  # the imported module, e.g. "broker.store.keys" or "redis.asyncio"
    names: tuple[str, ...]  # for `from target import a, b`: ("a", "b"); () for `import target`
    line: int

    @property
    def top(self) -> str:
        return self.target.partition(".")[0]

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{path_of(self.source)}:{self.line}: {what}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(BROKER.rglob("*.py"))}


def path_of(module: str) -> str:
    return str(MODULES[module].relative_to(REPO))


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def layer_of(module: str) -> str:
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    layer = module.split(".")[1]
    assert layer in (*LAYERS, CLIENT), f"{path_of(module)}: broker/{layer}/ is in no layer; add it to the table"
    return layer


def imports_of(module: str) -> Iterator[Import]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(a.name for a in node.names)
            # `from broker.cli import dlq` imports the module broker.cli.dlq; `from broker.cli import main` the name
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            rest = tuple(n for n in names if n not in submodules)
            for n in submodules:
                yield Import(module, f"{base}.{n}", (), node.lineno)
            if rest or not submodules:
                yield Import(module, base, rest, node.lineno)


IMPORTS = [imp for m in MODULES for imp in imports_of(m)]
INTERNAL = [imp for imp in IMPORTS if imp.top == "broker"]
EXTERNAL = [imp for imp in IMPORTS if imp.top != "broker"]


def _target_module(imp: Import) -> str:
    """The broker module an internal import reaches (a name imported from a package is the package's)."""
    target = imp.target
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def test_the_table_covers_every_module() -> None:
    assert len(MODULES) > 40
    layers = {layer_of(m) for m in MODULES}
    assert layers == {*LAYERS, CLIENT}, layers


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    bad = []
    for imp in INTERNAL:
        src, dst = layer_of(imp.source), layer_of(_target_module(imp))
        if CLIENT in (src, dst):
            continue  # the client's own rules are the next test
        if LAYERS.index(dst) > LAYERS.index(src):
            bad.append(f"{imp}  ({src} imports {dst})")
    assert not bad, "imports from a layer above:\n" + "\n".join(bad)


def test_the_client_stands_apart() -> None:
    bad = []
    for imp in INTERNAL:
        src, target = layer_of(imp.source), _target_module(imp)
        dst = layer_of(target)
        if src == CLIENT and dst != CLIENT and target not in CLIENT_MAY_IMPORT:
            bad.append(f"{imp}  (the client imports only broker.client.* and {sorted(CLIENT_MAY_IMPORT)})")
        if dst == CLIENT and src != CLIENT and src not in MAY_IMPORT_CLIENT:
            bad.append(f"{imp}  (only {sorted(MAY_IMPORT_CLIENT)} use the client)")
    assert not bad, "\n".join(bad)


def test_the_client_uses_only_its_own_dependencies() -> None:
    """What `pip install redis-ws-broker` installs (pyproject's [project] dependencies) and the standard library."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    allowed = {n.replace("-", "_").lower() for n in names} | set(sys.stdlib_module_names)
    bad = [str(imp) for imp in EXTERNAL if layer_of(imp.source) == CLIENT and imp.top not in allowed]
    assert not bad, f"the client imports beyond {sorted(names)}:\n" + "\n".join(bad)


def test_only_the_store_talks_to_redis() -> None:
    bad = [str(imp) for imp in EXTERNAL if imp.top in REDIS and layer_of(imp.source) != "store"]
    assert not bad, "Redis client imports outside broker/store:\n" + "\n".join(bad)


def test_only_resilience_imports_the_breaker_and_retry_libraries() -> None:
    bad = [
        str(imp)
        for imp in EXTERNAL
        if imp.top in RESILIENCE
        and imp.source != RESILIENCE_HOME
        and not (layer_of(imp.source) == CLIENT and imp.top in CLIENT_MAY_USE_RESILIENCE)
    ]
    assert not bad, f"{sorted(RESILIENCE)} outside {RESILIENCE_HOME}:\n" + "\n".join(bad)


def test_the_core_does_no_io() -> None:
    bad = [str(imp) for imp in EXTERNAL if layer_of(imp.source) == "core" and imp.top in CORE_MUST_NOT_IMPORT]
    assert not bad, "I/O imports in broker/core:\n" + "\n".join(bad)


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assigned names and attributes."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
    return own


TREES = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items()}
DEFINED = {m: _defined_names(t) for m, t in TREES.items()}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _foreign_privates(module: str) -> Iterator[str]:
    """Private names of other broker modules that ``module`` uses: imported (``from broker.store.x import _y``),
    or an attribute it does not define itself, used on something other than ``self``/``cls``, that another broker
    module defines (``store._run(...)``, ``session._error(...)``). Privates of third-party libraries are not ours to
    police here."""
    theirs = {n for m, names in DEFINED.items() if m != module for n in names if _is_private(n)}
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broker"):
            for alias in node.names:
                if _is_private(alias.name):
                    yield f"{path_of(module)}:{node.lineno}: from {node.module} import {alias.name}"
        elif (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and node.attr in theirs
            and node.attr not in DEFINED[module]
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            yield f"{path_of(module)}:{node.lineno}: {ast.unparse(node)}"


def test_no_module_uses_another_modules_privates() -> None:
    """Modules that hold a store (node, ops, cli) call its public methods only, and so for every other object: a
    private helper is private to its module."""
    bad = [use for m in MODULES for use in _foreign_privates(m)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), Tarjan's way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], int] = {}
    for imp in INTERNAL:
        target = _target_module(imp)
        if target != imp.source:
            graph[imp.source].add(target)
            lines.setdefault((imp.source, target), imp.line)
    cycles = _cycles(graph)
    described = []
    for component in cycles:
        members = set(component)
        edges = [f"  {path_of(a)}:{lines[(a, b)]} imports {b}" for a in component for b in sorted(graph[a] & members)]
        described.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(described)
