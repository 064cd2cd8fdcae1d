"""Every script in examples/ runs in its smoke mode, and the notebook runs, so none can rot.

A new example needs nothing here: it is found by the glob and must accept ``--smoke`` (a run of a
few seconds that still exercises every step it shows). Lines it prints only when its own checks
passed go in EXPECT. The notebook's code cells run in order as one script in a fresh process (no
Jupyter needed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# Lines an example prints only when its own checks passed.
EXPECT = {
    "sst2_lora.py": ["dev accuracy", "reloaded it: same outputs", "with the same outputs"],
    "ner_adapter.py": ["dev entity span F1", "reloaded it onto a fresh base: same outputs"],
    "prefix_generation.py": [
        "folded the prefix MLP",
        "the same tokens as without it",
        "same logits, same generations",
    ],
    "adalora_classification.py": [
        "ranks at the start (budget 96 triplets)",
        "ranks after 8 steps (budget 32 triplets)",
        "reloaded at the pruned ranks: identical outputs",
        "the merged model gives the same outputs",
    ],
    "compose_methods.py": [
        "reloaded adapters ['attn', 'ffn', 'prefix'] onto a fresh base: same outputs",
        "merged 4 layer(s)",
        "kept ffn:model.layers.0.mlp.down_proj",
        "kept prefix:prefix",
        "after the merge: ['ffn', 'prefix'] remain, same outputs",
    ],
    "deepspeed_zero3.py": [
        "q_proj.weight on this process: shape [0], ds_shape [64, 64]",
        "LoRA factors sized from ds_shape: {'lora_A': [4, 64], 'lora_B': [64, 4]}",
        "reloaded in one process: same logits",
    ],
    "quickstart.ipynb": [
        "reloaded onto a fresh base: same outputs",
        "Linear layers again: same outputs after the merge",
    ],
}
# Tiny models run fastest on one thread, and a shared machine's cores do not slow them down then.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def run(args: list[str], cwd: Path, name: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    missing = [line for line in EXPECT.get(name, []) if line not in done.stdout]
    assert not missing, f"{name} did not print {missing}:\n{done.stdout[-4000:]}"
    return done.stdout


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ holds no scripts"
    assert NOTEBOOKS, "examples/ holds no notebook"
    found = {p.name for p in EXAMPLES + NOTEBOOKS}
    assert set(EXPECT) <= found, f"EXPECT names examples that do not exist: {set(EXPECT) - found}"


def test_examples_readme_lists_every_example() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    unlisted = [p.name for p in EXAMPLES + NOTEBOOKS if p.name not in readme]
    assert not unlisted, f"examples/README.md does not list {unlisted}"


# Examples that need an optional package: slow (its import and start-up take tens of seconds), and
# skipped without the package. `nox -s distributed` installs DeepSpeed and runs them.
NEEDS = {"deepspeed_zero3.py": "deepspeed"}


def _smoke_param(script: Path) -> object:
    marks = [pytest.mark.slow] if script.name in NEEDS else []
    return pytest.param(script, marks=marks, id=script.name)


@pytest.mark.parametrize("script", [_smoke_param(p) for p in EXAMPLES])
def test_example_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    assert "--smoke" in script.read_text(), f"{script.name} must accept --smoke"
    package = NEEDS.get(script.name)
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{script.name} needs {package}, which is not installed (nox -s distributed)")
    run([str(script), "--smoke"], tmp_path, script.name)


def notebook_code(path: Path) -> str:
    """The notebook's code cells in order, one script; refuses committed outputs."""
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
        f"{path.name}: clear the outputs before committing (Cell > All Output > Clear)"
    )
    return "\n\n".join("".join(c["source"]) for c in code)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook: Path, tmp_path: Path) -> None:
    script = tmp_path / (notebook.stem + ".py")
    script.write_text(notebook_code(notebook))
    run([str(script)], tmp_path, notebook.name)
