"""The documentation site: every page in the navigation exists, every method page is listed, and
(where mkdocs is installed) the strict build passes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks() -> Any:
    spec = importlib.util.spec_from_file_location(
        "mkdocs_hooks", ROOT / "tools" / "mkdocs_hooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav() -> list[Any]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(DOCS)
    expanded: list[Any] = _hooks().on_config(config)["nav"]
    return expanded


def _paths(items: list[Any]) -> list[str]:
    out = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _paths(value) if isinstance(value, list) else [value]
    return out


def test_every_nav_entry_is_a_page() -> None:
    missing = [p for p in _paths(_nav()) if not (DOCS / p).is_file()]
    assert not missing, missing


def test_every_method_page_is_in_the_methods_section_known_methods_first() -> None:
    methods = next(
        item["Methods"] for item in _nav() if isinstance(item, dict) and "Methods" in item
    )
    listed = [next(iter(entry.values())) for entry in methods]
    assert sorted(listed) == sorted(f"methods/{p.name}" for p in (DOCS / "methods").glob("*.md"))
    assert listed[0] == "methods/lora.md"
    assert next(iter(methods[0])) == "LoRA"  # titled by the page's heading


def test_nav_expansion_orders_known_methods_then_others(tmp_path: Path) -> None:
    (tmp_path / "methods").mkdir()
    for name, title in [("zeta", "Zeta"), ("full", "Full"), ("lora", "LoRA"), ("adapter", "Ad")]:
        (tmp_path / "methods" / f"{name}.md").write_text(f"# {title}\n")
    config = {"docs_dir": str(tmp_path), "nav": [{"Home": "index.md"}, {"Methods": "methods/"}]}
    nav = _hooks().on_config(config)["nav"]
    assert nav[1]["Methods"] == [
        {"LoRA": "methods/lora.md"},
        {"Ad": "methods/adapter.md"},
        {"Full": "methods/full.md"},
        {"Zeta": "methods/zeta.md"},
    ]


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_strict_build(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
