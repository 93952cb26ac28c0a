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

No module reaches into another's state: a private attribute (`x._name`) is used on `self` or `cls`
only, and a module writes the fields (`obj.attr = ...`) of objects it made or owns, never of an
object handed to it from outside (the two tests below the import ones).
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


WIRE_USERS = ("ipc", "gdsllm.config", "gdsllm.service", "gdsllm.commands", "gdsllm", "gdsllm.cli", "gdsllm.__main__")


def test_only_the_service_and_above_speak_the_wire():
    """The engine and everything below it know nothing of messages (config checks endpoints): the engine's scheduler plans
    passes as its own dataclasses, and the service turns them into ipc's messages."""
    bad = [where for src, dst, where in edges() if dst == "ipc" and src not in WIRE_USERS]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = []
    for path in sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and layer_of(node.module or "") is not None:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names used from another module:\n" + "\n".join(bad)


# Private names of other libraries, used on purpose: (file, expression) -> why.
FOREIGN_PRIVATE = {
    ("gdsllm/cli.py", "p._actions"): "argparse has no public list of a sub-parser's options",
    ("ipc/sockets.py", "os._exit"): "os._exit is public API (exit without the interpreter's teardown)",
    ("gdsllm/models/cpu_compiled.py", "torch._dynamo"):
        "Dynamo's specialize_float has no public spelling in torch 2.13 (torch.compiler.config lacks it)",
    ("gdsllm/quant/triton_gemm.py", "x._version"):
        "a tensor's version counter (bumped by every in-place write, shared by views) has no "
        "public name; it tells planes_x that an activation is unchanged",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path) -> list[str]:
    """'file:line expr' for each attribute access to a private name (`_x`, not `__x__`) on anything
    but self / cls / super() (`getattr(obj, "_x")` too); torch.ops.* names are operator names, not
    private state."""
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) and \
                _private(node.args[1].value) and not (isinstance(node.args[0], ast.Name) and
                                                      node.args[0].id in ("self", "cls")):
            out.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        v, expr = node.value, ast.unparse(node)
        if isinstance(v, ast.Name) and v.id in ("self", "cls") or \
                isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super" or \
                expr.startswith("torch.ops.") or (rel, expr) in FOREIGN_PRIVATE:
            continue
        out.append(f"{rel}:{node.lineno} {expr}")
    return out


def test_no_private_attribute_is_used_from_outside():
    bad = [b for path in sources() for b in private_uses(path)]
    assert not bad, "private attributes used on another object:\n" + "\n".join(bad)


# Writes into objects handed over from outside that are allowed for now: (file, expression) -> why.
FOREIGN_WRITES = {
    # A command's own parsed options (argparse.Namespace), normalized once before use.
    ("gdsllm/commands/bench.py", "args.device"): "argparse.Namespace of the command",
    ("gdsllm/commands/generate.py", "args.prompt"): "argparse.Namespace of the command",
}


def _made_by_calls(fn) -> set[str]:
    """Names a function binds to what a call returns (`x = f()`, `a, b = f()`, `with f() as x`)."""
    out = set()
    for node in ast.walk(fn):
        pairs = []
        if isinstance(node, ast.Assign):
            pairs = [(t, node.value) for t in node.targets]
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            pairs = [(i.optional_vars, i.context_expr) for i in node.items if i.optional_vars is not None]
        elif isinstance(node, ast.NamedExpr):
            pairs = [(node.target, node.value)]
        for target, value in pairs:
            if isinstance(value, (ast.Call, ast.Await)):
                out |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return out


def foreign_writes(path: Path) -> list[str]:
    """'file:line expr' for each write to a field of an object this module did not make or own:
    a parameter of a public function or method (its caller, in another module, handed it over;
    unless annotated with a class of this module), a local alias of one, one passed on to a
    function or `self.` method of this module, `self.x` where the class never made x itself
    (`self.x = SomeCall(...)`): handed over too, or `a.b.c` other than `self.b.c`: b is a's."""
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(), rel)
    local_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    funcs = []  # (function, the attributes its class makes, or None outside a class)

    def collect(node, made_attrs: set[str] | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                collect(child, {t.attr for n in ast.walk(child) if isinstance(n, ast.Assign)
                                and isinstance(n.value, (ast.Call, ast.Await)) for t in n.targets
                                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                and t.value.id == "self"})
            else:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs.append((child, made_attrs))
                collect(child, made_attrs)

    collect(tree, None)
    by_name = {(made is not None, fn.name): fn for fn, made in funcs}  # method or function, by name
    params = {fn: [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs] for fn, _ in funcs}
    foreign = {fn: {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                    if not fn.name.startswith("_") or fn.name.endswith("__")}  # public: from outside
               - {"self", "cls"} - {a.arg for a in fn.args.args + fn.args.kwonlyargs if a.annotation is not None
                                    and {n.id for n in ast.walk(a.annotation) if isinstance(n, ast.Name)} & local_classes}
               for fn, _ in funcs}

    def handed(v, made_attrs) -> bool:  # self.x that the class did not make
        return made_attrs is not None and isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) \
            and v.value.id == "self" and v.attr not in made_attrs

    def outside(fn, made_attrs) -> set[str]:
        """Names in `fn` bound to objects from outside: foreign parameters and their aliases."""
        names, made = set(foreign[fn]), _made_by_calls(fn)
        for node in ast.walk(fn):  # `c = self.c`, `w = worker`
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id not in made and (isinstance(node.value, ast.Name) and
                                                            node.value.id in names or handed(node.value, made_attrs)):
                names.add(node.targets[0].id)
        return names

    changed = True
    while changed:  # what is handed to this module's own functions is still from outside
        changed = False
        for fn, made_attrs in funcs:
            names = outside(fn, made_attrs)
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                f = call.func
                callee = by_name.get((False, f.id)) if isinstance(f, ast.Name) else \
                    by_name.get((True, f.attr)) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and f.value.id == "self" else None
                if callee is None:
                    continue
                names_of = params[callee][1:] if isinstance(f, ast.Attribute) else params[callee]
                passed = list(zip(names_of, call.args)) + [(k.arg, k.value) for k in call.keywords if k.arg]
                for param, value in passed:
                    if param not in foreign[callee] and (isinstance(value, ast.Name) and value.id in names
                                                         or handed(value, made_attrs)):
                        foreign[callee].add(param)
                        changed = True
    out = set()
    for fn, made_attrs in funcs:
        names = outside(fn, made_attrs)
        for node in ast.walk(fn):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, (ast.Store, ast.Del)):
                continue
            v = node.value
            held = isinstance(v, ast.Attribute) and not (  # `a.b.c = `: b is a's, not ours
                made_attrs is not None and isinstance(v.value, ast.Name) and v.value.id == "self")
            if isinstance(v, ast.Name) and v.id in names or handed(v, made_attrs) or held:
                out.add((node.lineno, ast.unparse(node)))
    return [f"{rel}:{line} {expr}" for line, expr in sorted(out)]


def test_no_module_writes_the_fields_of_an_object_handed_to_it():
    found = [b for path in sources() for b in foreign_writes(path)]
    allowed = {(b.split(":")[0], b.split(" ", 1)[1]) for b in found} & set(FOREIGN_WRITES)
    bad = [b for b in found if (b.split(":")[0], b.split(" ", 1)[1]) not in allowed]
    assert not bad, "fields of another module's object written:\n" + "\n".join(bad)
    stale = sorted(set(FOREIGN_WRITES) - allowed)
    assert not stale, f"FOREIGN_WRITES entries that match nothing any more (remove them): {stale}"


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


def test_the_checker_sees_private_uses_and_foreign_writes(tmp_path, monkeypatch):
    """The ownership checks fail on a tree that reaches into other objects (the shapes the service
    had before issue 21: free functions writing a worker's fields, a supervisor writing its
    coordinator's) and pass the shapes that are fine."""
    bad = """
class Supervisor:
    def __init__(self, coordinator):
        self.c = coordinator
        self.made = dict()

    def fault(self, detail):
        c = self.c
        c.status = "restarting"          # an alias of an object handed over
        self.c.detail = detail           # the same, directly
        self.made.size = 1               # fine: the class made it

def run_experts(worker, msg):
    _run(worker, msg)

def _run(worker, msg):
    worker.pass_failed = True            # handed over through a private helper
    worker.runner._pass = None           # a private name of another object, written
    return getattr(worker, "_send")

def fine(n):
    report = Report()
    report.done = n                      # made here
    with open_thing() as t:
        t.timeout = n
"""
    (tmp_path / "gdsllm").mkdir()
    (tmp_path / "gdsllm" / "m.py").write_text(bad)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    path = tmp_path / "gdsllm" / "m.py"
    assert [w.split(" ", 1)[1] for w in foreign_writes(path)] == [
        "c.status", "self.c.detail", "worker.pass_failed", "worker.runner._pass"]
    assert [u.split(" ", 1)[1] for u in private_uses(path)] == [
        "worker.runner._pass", "getattr(worker, '_send')"]
    with pytest.raises(AssertionError, match="gdsllm/m.py:17 worker.pass_failed"):
        test_no_module_writes_the_fields_of_an_object_handed_to_it()
    with pytest.raises(AssertionError, match="private attributes used on another object"):
        test_no_private_attribute_is_used_from_outside()
