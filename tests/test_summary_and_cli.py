"""trainable_summary, the demo command, and the README/CI contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit import apply_lora
from peftkit.cli import main

from zoo import CASES, TinyTransformer

ROOT = Path(__file__).resolve().parents[1]


def test_summary_counts_and_table() -> None:
    model = TinyTransformer()
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=4, targets=["q_proj"])
    apply_lora(model, r=2, targets=["v_proj"], adapter_name="small")
    summary = peftkit.trainable_summary(model)
    lora_params = 2 * (4 * 32 + 32 * 4)
    small_params = 2 * (2 * 32 + 32 * 2)
    assert summary.trainable == lora_params + small_params
    assert summary.total == total + lora_params + small_params
    assert [(r.name, r.params, r.details["rank"]) for r in summary.adapters] == [
        ("default", lora_params, 4),
        ("small", small_params, 2),
    ]
    text = str(summary)
    assert text.startswith(f"trainable {summary.trainable:,} of {summary.total:,} parameters")
    assert re.search(r"small\s+lora\s+yes\s+256", text)


def test_summary_counts_tied_weights_once() -> None:
    model = CASES["gpt2"].build()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert peftkit.trainable_summary(model).total == sum(unique.values())


def test_demo_prints_a_row_per_method_with_passing_checks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    for name in peftkit.methods():
        assert re.search(rf"^\| {re.escape(name)}\s", out, re.M), out
    assert "MISMATCH" not in out
    assert "| method" in out and "save/load" in out


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in done.stdout


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, re.S)
    assert len(commands) >= 2
    main_job, tests = commands[0].strip(), commands[1].strip()
    assert "peftkit demo" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the CI script must run the README's test command"
