"""The package's import graph has no loops and points down its floors, and every module imports: a new loop, an
upward import or a broken import fails here.

The graph counts every `import` of a twinlm module anywhere in a module (also inside functions: a lazy import
only hides a loop until someone imports the other side first); `if TYPE_CHECKING:` imports are counted too for
the loop test (a type-only circle is still a circle for a reader and a type checker).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import twinlm

ROOT = Path(twinlm.__file__).parent


def _modules() -> dict[str, Path]:
    out = {"twinlm": ROOT / "__init__.py"}
    for m in pkgutil.walk_packages(twinlm.__path__, "twinlm."):
        rel = m.name.split(".")[1:]
        path = ROOT.joinpath(*rel)
        out[m.name] = path / "__init__.py" if m.ispkg else path.with_suffix(".py")
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str], type_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set() if type_only else {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                                    and _is_type_checking(node) for child in node.body for n in ast.walk(child)}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    found.add(sub)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the twinlm modules it imports (with `type_only`, also those under `if TYPE_CHECKING:`)."""
    mods = _modules()
    return {name: _imports(name, path, set(mods), type_only) for name, path in mods.items()}


# The floors of the package, top first: a module imports its own floor or lower ones, never a higher one. A
# module belongs to the first floor one of whose names is the module or a package above it.
FLOORS = [
    ("twinlm.cli", "twinlm.__main__", "twinlm.lm_eval"),  # the command line: above every area, imported by none
    ("twinlm.suite",),
    ("twinlm.eval",),
    ("twinlm.train",),
    ("twinlm.convert", "twinlm.loading", "twinlm.reseal"),
    ("twinlm.model", "twinlm.generate"),
    ("twinlm.export",),
    ("twinlm.data", "twinlm.hf", "twinlm.memory"),
    ("twinlm.attention", "twinlm.config", "twinlm.configs", "twinlm.hub", "twinlm.card"),
    ("twinlm.io", "twinlm.errors", "twinlm.ops"),
]


def floor_of(module: str) -> int:
    """The floor's index (0 = top) of a module; KeyError for a module no floor names (place it in FLOORS)."""
    for i, names in enumerate(FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise KeyError(f"{module} is on no floor: add it to FLOORS in tests/test_imports.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    graph = import_graph()
    assert len(graph) > 30
    assert _cycles(graph) == []


def test_no_import_loops_type_only_imports_included():
    assert _cycles(import_graph(type_only=True)) == []


def test_imports_point_down_the_floors():
    # `twinlm/__init__.py` only re-exports (lazily) what users load: it stands outside the floors
    graph = {m: deps for m, deps in import_graph(type_only=True).items() if m != "twinlm"}
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if d != "twinlm" and floor_of(d) < floor_of(m))
    assert upward == []


def test_floor_check_finds_an_upward_import():
    assert floor_of("twinlm.data.prepare") > floor_of("twinlm.train.recipe")  # data/ -> train/ would be upward
    assert floor_of("twinlm.cli.data") == 0


def test_loop_detector_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports():
    for name in _modules():
        if not name.endswith("__main__"):  # runs the CLI when imported
            importlib.import_module(name)


def test_cli_help_stays_light():
    # `twinlm --help` must not import torch: the CLI registers commands and imports heavy modules in handlers.
    code = "import sys; from twinlm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
