"""The documentation site: every page in the navigation exists, every method page is listed,
(where mkdocs is installed) the strict build passes, and the README's Quickstart runs as written."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import peftkit

from zoo import CASES

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


def _readme_quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README.md: no python block under '## Quickstart'"
    return match.group(1)


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The snippet, with only its placeholders filled: a tiny Llama saved to disk and tiny data."""
    model_dir = tmp_path / "model"
    CASES["llama"].build().save_pretrained(model_dir)
    code = _readme_quickstart()
    for placeholder, value in [
        ("path/to/model", model_dir),
        ("runs/x", tmp_path / "runs"),
        ("out/", tmp_path / "out"),
    ]:
        assert f'"{placeholder}"' in code, f"README Quickstart no longer uses {placeholder!r}"
        code = code.replace(f'"{placeholder}"', repr(str(value)))
    ids = torch.randint(50, (12, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    namespace: dict[str, Any] = {"train_data": rows[:8], "eval_data": rows[8:]}
    exec(compile(code, "README.md (Quickstart)", "exec"), namespace)

    model, fresh = namespace["model"], namespace["fresh"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "peftkit_config.json",
        "peftkit_model.safetensors",
    ]
    assert (tmp_path / "runs" / "log.jsonl").is_file()
    assert not peftkit.adapters(model)  # merged and unloaded: a plain model
    assert list(peftkit.adapters(fresh)) == ["default"]
    with torch.no_grad():  # the trained update survived save / load and the merge alike
        trained = fresh(input_ids=ids[:2]).logits
        torch.testing.assert_close(model(input_ids=ids[:2]).logits, trained)
        with peftkit.disable_adapters(fresh):
            assert not torch.allclose(fresh(input_ids=ids[:2]).logits, trained)
