"""The import graph of relay/ (read with ast, imports inside functions included): no cycles, and no
module imports back up the chain cli ← commands (daemon, serve, tail/publish, check) ← pipeline ←
sources and sinks. Errors travel up as values (relay/errors.py); only cli.py makes exit codes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relay"

# Layers from the top; a module may import its own layer and those below it, never one above.
# Modules in no layer (config, message, events, ...) are the shared base: they import no layer.
LAYERS: list[tuple[str, ...]] = [
    ("relay.__main__", "relay.cli"),
    ("relay.daemon", "relay.client_commands", "relay.check", "relay.server.app"),
    ("relay.pipeline",),
    ("relay.sources.", "relay.sinks"),  # relay.sources itself is the registry, in the base
]
BASE = len(LAYERS)
# The source engine is the registry's other half: every source imports it, it imports no source.
SHARED = ("relay.sources.engine",)


def layer(module: str) -> int:
    if module in SHARED:
        return BASE
    for depth, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module.startswith(prefix) if prefix.endswith(".") else (
                    module == prefix or module.startswith(prefix + ".")):
                return depth
    return BASE


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "proto" in path.relative_to(PACKAGE).parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The relay modules `module` imports, each with the line of its first import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            # `from relay import sources` imports the module relay.sources, not a name in relay
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            if name in known and name != module:
                found.setdefault(name, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(graph()) == []


def test_no_module_imports_back_up_the_chain() -> None:
    known = modules()
    upward = [f"{known[module].relative_to(ROOT)}:{line} imports {target}"
              for module, targets in sorted(graph().items()) for target, line in sorted(targets.items())
              if layer(target) < layer(module)]
    assert upward == []


def test_the_checks_see_what_they_must() -> None:
    """The graph is read right: known edges are there, and a cycle or an upward import is found."""
    edges = graph()
    assert "relay.pipeline" in edges["relay.daemon"] and "relay.daemon" in edges["relay.cli"]
    assert "relay.sinks" in edges["relay.pipeline"]  # the Sink protocol, not a sink
    assert "relay.server.app" in edges["relay.daemon"]  # an import inside a function counts too
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert layer("relay.sources.file") > layer("relay.pipeline") > layer("relay.daemon") > layer("relay.cli")
    assert layer("relay.sources") == layer("relay.config") == BASE
    assert all(layer(m) < BASE for m in ("relay.check", "relay.client_commands", "relay.server.app"))
    assert {m for m in edges if layer(m) < BASE} >= {"relay.check", "relay.sinks.grpc_centrifugo"}


def test_only_the_cli_makes_exit_codes() -> None:
    offenders = []
    for module, path in sorted(modules().items()):
        if module == "relay.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            name = ast.unparse(called) if called is not None else ""
            raised = ast.unparse(node.exc) if isinstance(node, ast.Raise) and node.exc is not None else ""
            if name in ("sys.exit", "os._exit", "exit", "quit") or raised.startswith("SystemExit"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
