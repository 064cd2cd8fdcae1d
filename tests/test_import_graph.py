"""The modules of ``src/peftkit`` import each other without a cycle, and each imports on its own.

The graph counts every import of a peftkit module, at module level and inside functions alike (a
function-level import only hides a cycle until the function runs). Imports under
``if TYPE_CHECKING:`` are left out: they never run. Importing ``a.b.c`` also runs the packages
``a`` and ``a.b`` (their ``__init__``), so those count as imported too, except the importer's own
enclosing packages, which are already being imported when it runs; importing a *name* (not a
submodule) from an enclosing package does count, since that name must already exist.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "peftkit"


def _module_names() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


MODULES = _module_names()


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """Ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_packages(target: str, importer: str) -> set[str]:
    """``target`` and every package its import runs, less the importer's enclosing packages."""
    parts = target.split(".")
    out = {".".join(parts[: i + 1]) for i in range(len(parts))}
    enclosing = {importer.rsplit(".", i)[0] for i in range(1, importer.count(".") + 1)}
    return {m for m in out if m in MODULES and m not in enclosing and m != importer}


def _imports(module: str) -> set[str]:
    """The peftkit modules ``module`` imports, anywhere in it but ``TYPE_CHECKING`` blocks."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peftkit":
                    out |= _with_packages(alias.name, module)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_package, node)
            if target.split(".")[0] != "peftkit":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    out |= _with_packages(sub, module)
                else:  # a name defined in ``target`` itself
                    out |= _with_packages(target, module) | ({target} - {module})
    return out


def import_graph() -> dict[str, set[str]]:
    return {module: _imports(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports_and_package_inits() -> None:
    graph = import_graph()
    # core imports the plain-model hooks inside a function; it counts
    assert "peftkit._compat" in graph["peftkit.core"]
    # evaluation imports peftkit.losses.functional, which runs peftkit/losses/__init__.py first
    assert {"peftkit.losses", "peftkit.losses.functional"} <= graph["peftkit.training.evaluation"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_peftkit_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


_CHILD = """
import importlib, os, sys

def alone(name):
    # import ``name`` first thing in a forked child (no peftkit module loaded); the child prints
    # the peftkit modules that import loaded, or the error
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            out = " ".join(m for m in sys.modules if m.split(".")[0] == "peftkit")
            code = 0
        except BaseException as error:
            out, code = f"{name}: {type(error).__name__}: {error}", 1
        os.write(write, out.encode())
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return status == 0, b"".join(chunks).decode()

ok, loaded = alone("peftkit")
if not ok:
    print("FAILED", loaded)
    sys.exit(1)
done = set(loaded.split())
for name in sys.argv[1:]:
    if name in done:
        continue  # ``import peftkit.x`` runs the package first, which imports x: the same run
    ok, out = alone(name)
    if not ok:
        print("FAILED", out)
print("separately:", len([n for n in sys.argv[1:] if n not in done]))
"""


# the quantization backends import their (optional, slow to import) library at module level
BACKENDS = [m for m in MODULES if m.startswith("peftkit.quant.")]


def _import_each_alone(names: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    code = "import torch, safetensors.torch\n" + _CHILD
    done = subprocess.run(
        [sys.executable, "-c", code, *names], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    assert "separately:" in done.stdout
    return done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module imports first thing in a process of its own, as ``python -c "import m"`` would.

    One interpreter loads the third-party libraries (torch, safetensors) once, imports nothing of
    peftkit, and forks a child per import: each child starts with no peftkit module loaded, so
    peftkit's import order in it is exactly that of a fresh interpreter. ``import peftkit.x`` runs
    ``peftkit/__init__.py`` before ``x``; when the package already imports ``x``, that is the very
    run ``import peftkit`` makes, so only the modules the package does not load get a child of
    their own.
    """
    names = [m for m in MODULES if m != "peftkit.__main__" and m not in BACKENDS]
    _import_each_alone(names)  # __main__ runs the CLI; the backends are the slow test's


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_quantization_backend_imports_alone() -> None:
    """As above for ``peftkit.quant.<backend>``, each importing its library (~10 s apiece)."""
    _import_each_alone(BACKENDS)
