"""The package import graph is layered and acyclic: a subpackage imports only from layers below it.

    ipc, format  <-  quant  <-  models  <-  convert  <-  engine  <-  config  <-  service  <-  commands
                                                                             <-  the top: gdsllm/__init__, cli, torch

- ipc and format are the two bottoms: the wire and the files; neither imports the other.
- convert sits between the models and the engine: converters write the format (quantizing with
  quant, using the models' rotary for permutations); the engine reads converted models (and
  converts the embedded default once, on first use).
- config (the one frozen ServiceConfig) is what the service and the commands share.

Every import counts, also one inside a function: a lazy import is still a dependency. The walk is
over the source (ast), so it needs no import of torch and is quick.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RANKS = {
    "ipc": 0, "gdsllm.format": 0, "gdsllm.version": 0,
    "gdsllm.quant": 1,
    "gdsllm.models": 2,
    "gdsllm.convert": 3,
    "gdsllm.engine": 4,
    "gdsllm.config": 5,
    "gdsllm.service": 6,
    "gdsllm.commands": 7,
    "gdsllm": 8, "gdsllm.cli": 8, "gdsllm.__main__": 8, "gdsllm.torch": 8,
}
TOP = 8  # entry points: they may use each other (python -m gdsllm runs the cli)


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name ('gdsllm.engine.llm' -> 'gdsllm.engine'), None if not ours."""
    parts = module.split(".")
    if parts[0] == "ipc":
        return "ipc"
    if parts[0] != "gdsllm":
        return None
    return "gdsllm" if len(parts) == 1 else f"gdsllm.{parts[1]}"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # `from . import x`: each name is a module
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def sources() -> list[Path]:
    return sorted(p for d in ("gdsllm", "ipc") for p in (ROOT / d).rglob("*.py"))


def edges() -> list[tuple[str, str, str]]:
    """(from layer, to layer, 'file:line module') for every import across layers."""
    out = []
    for path in sources():
        src = layer_of(module_name(path))
        for line, mod in imports(path):
            dst = layer_of(mod)
            if dst is not None and dst != src:
                out.append((src, dst, f"{path.relative_to(ROOT)}:{line} imports {mod}"))
    return out


def test_every_layer_is_ranked():
    layers = {layer_of(module_name(p)) for p in sources()}
    assert layers <= set(RANKS), f"unranked layers: {sorted(layers - set(RANKS))}"


def test_no_import_goes_up_or_sideways():
    bad = [where for src, dst, where in edges()
           if RANKS[dst] > RANKS[src] or RANKS[dst] == RANKS[src] != TOP]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = []
    for path in sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and layer_of(node.module or "") is not None:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names used from another module:\n" + "\n".join(bad)


def test_the_layer_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in list(graph):
        if n not in state:
            visit(n, [n])


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above are only worth something if they fail on a bad tree: build one."""
    for rel, text in {"gdsllm/__init__.py": "", "gdsllm/format/__init__.py": "",
                      "gdsllm/format/a.py": "def f():\n    from gdsllm.engine import b\n",
                      "gdsllm/engine/__init__.py": "", "gdsllm/engine/b.py": "from gdsllm.format import a\n",
                      "ipc/__init__.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert ("gdsllm.format", "gdsllm.engine") in {(s, d) for s, d, _ in edges()}
    with pytest.raises(AssertionError, match="gdsllm/format/a.py:2 imports gdsllm.engine"):
        test_no_import_goes_up_or_sideways()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_the_layer_graph_has_no_cycle()
