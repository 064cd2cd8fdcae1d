"""Every script in examples/ runs in its smoke mode, so none can rot.

A new example needs nothing here: it is found by the glob and must accept ``--smoke`` (a run of a
few seconds that still exercises every step it shows).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Lines an example prints only when its own checks passed.
EXPECT = {"sst2_lora.py": ["dev accuracy", "reloaded it: same outputs", "with the same outputs"]}


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ holds no scripts"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    assert "--smoke" in script.read_text(), f"{script.name} must accept --smoke"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, (
        f"{script.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
