"""Reliability corpus, no pickle: nothing peftkit ships can unpickle (unpickling runs code).

The scan parses every Python file (an AST walk, not a grep, so comments and strings do not count and
aliases such as ``from torch import load`` do) and refuses: pickle-family imports, ``torch.load``
without ``weights_only=True``, ``numpy.load(..., allow_pickle=True)``, ``torch.jit.load`` and
``pandas.read_pickle``. The scanner itself is tested on snippets, so it cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftkit

ROOT = Path(peftkit.__file__).resolve().parents[2]
SCANNED = [ROOT / "src" / "peftkit", ROOT / "benchmarks", ROOT / "examples"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
ALWAYS_UNSAFE = {"torch.jit.load", "pandas.read_pickle", "torch.serialization.load"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.load`` for ``torch.load``, ``th.load`` (import torch as th) or ``load`` (from torch)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _imports(tree: ast.AST) -> tuple[dict[str, str], list[str]]:
    """Local name -> dotted origin for every import, and the pickle-family imports."""
    aliases: dict[str, str] = {}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases, found


def _is_unsafe_call(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func, aliases) or ""
    if name.startswith("numpy."):
        name = "np." + name[len("numpy.") :]
    unsafe = (
        name in ALWAYS_UNSAFE
        or (name == "torch.load" and not _keyword_is_true(call, "weights_only"))
        or (name == "np.load" and _keyword_is_true(call, "allow_pickle"))
        or name.split(".")[0] in PICKLE_MODULES
    )
    return name if unsafe else None


def unsafe_uses(source: str) -> list[str]:
    """Descriptions of every unsafe deserialisation in ``source``."""
    tree = ast.parse(source)
    aliases, found = _imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _is_unsafe_call(node, aliases)):
            found.append(f"line {node.lineno}: {name}(...)")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import torch\ntorch.load('x')",
        "import torch as th\nth.load('x', weights_only=False)",
        "from torch import load\nload('x')",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import torch\ntorch.jit.load('x')",
        "from dill import loads",
        "import joblib\njoblib.load('x')",
    ],
    ids=lambda snippet: snippet.splitlines()[-1],
)
def test_the_scanner_catches_unsafe_loading(snippet: str) -> None:
    assert unsafe_uses(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x', weights_only=True)",
        "import numpy as np\nnp.load('x')",
        "# torch.load('x') in a comment\ntext = 'pickle.load'",
        "from safetensors.torch import load_file\nload_file('x')",
    ],
    ids=lambda snippet: snippet.splitlines()[-1],
)
def test_the_scanner_allows_safe_loading(snippet: str) -> None:
    assert not unsafe_uses(snippet)


def test_shipped_code_never_unpickles() -> None:
    files = [p for root in SCANNED if root.exists() for p in sorted(root.rglob("*.py"))]
    assert any(p.name == "checkpoint.py" for p in files), "the scan found no source"
    offenders = {
        str(p.relative_to(ROOT)): uses for p in files if (uses := unsafe_uses(p.read_text()))
    }
    assert not offenders, offenders
