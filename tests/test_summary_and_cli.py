"""trainable_summary, the demo command, and the README/CI contract."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import peftkit
from peftkit import apply_lora, demo
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
        assert re.search(rf"^\| {re.escape(name)}\s.*\| ok\s+\|$", out, re.M), out
    assert "MISMATCH" not in out and "failed" not in out
    assert "| method" in out and "save/load" in out


def test_demo_reports_a_failing_method_in_its_row_runs_the_rest_and_exits_non_zero(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = demo.run_method

    def flaky(name: str, *args: Any) -> demo.DemoRow:
        if name == "adapter":
            raise RuntimeError("no attention\nhere")
        return real(name, *args)

    monkeypatch.setattr(demo, "run_method", flaky)
    assert main(["demo", "--steps", "2"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\| adapter .*\| failed: RuntimeError: no attention here \|$", out, re.M)
    others = [name for name in peftkit.methods() if name != "adapter"]
    for name in others:
        assert re.search(rf"^\| {re.escape(name)}\s.*\| ok\s+\|$", out, re.M), out
    assert out.rstrip().endswith("failed: adapter")


def test_a_demo_row_whose_outputs_are_not_reproduced_is_not_ok() -> None:
    row = demo.DemoRow(method="m", merge_diff=None, reload_diff=1.0)
    assert not row.ok and "failed: outputs not reproduced" in demo.format_table([row])
    assert demo.DemoRow(method="m", reload_diff=0.0).ok


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, check=False
    )


def test_python_dash_m_entry_point() -> None:
    done = _python_m("--help")
    assert done.returncode == 0 and "demo" in done.stdout


def test_python_dash_m_without_a_command_prints_help_and_exits_0() -> None:
    done = _python_m()
    assert done.returncode == 0, done.stderr
    assert "usage: peftkit" in done.stdout and "demo" in done.stdout


def test_version_flag_prints_the_package_version() -> None:
    done = _python_m("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"peftkit {peftkit.__version__}"
    assert peftkit.__version__ == importlib.metadata.version("peftkit")


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, re.S)
    assert len(commands) >= 2
    main_job, tests = commands[0].strip(), commands[1].strip()
    assert "peftkit demo" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the CI script must run the README's test command"
