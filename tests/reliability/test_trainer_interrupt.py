"""Reliability corpus, Ctrl-C: SIGINT during ``Trainer.fit`` stops the run at the next step
boundary, writes a checkpoint of that step and raises ``KeyboardInterrupt`` naming it; resuming
it ends with the weights of a run that never stopped. A second SIGINT aborts at once.

The run (sigint_worker.py) is a real process, interrupted at several points; every wait is
bounded, so a hang fails the test instead of stalling the suite. Cases are listed in
docs/reliability.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.training import state as S

from sigint_worker import STEPS, fit

WORKER = Path(__file__).with_name("sigint_worker.py")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peftkit.adapter_state_dict(fit(tmp_path_factory.mktemp("uninterrupted")))
    finally:
        torch.set_num_threads(before)


def _start(out: Path, pace: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(pace), str(torch.get_num_threads())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _steps_logged(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _wait_for_step(proc: subprocess.Popen[str], out: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while _steps_logged(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"step {step} not reached within 120 s"
        time.sleep(0.005)


@pytest.mark.parametrize(("after", "delay"), [(1, 0.0), (3, 0.02), (7, 0.05)],
                         ids=["after-step-1", "mid-step-4", "mid-step-8"])  # fmt: skip
def test_sigint_stops_at_a_step_boundary_saves_and_resumes_exactly(
    tmp_path: Path,
    one_thread: None,
    uninterrupted: dict[str, torch.Tensor],
    after: int,
    delay: float,
) -> None:
    out = tmp_path / "interrupted"
    proc = _start(out, pace=0.03)
    try:
        _wait_for_step(proc, out, after)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)  # a hang fails here
    finally:
        proc.kill()
    assert proc.returncode == 3, (stdout, stderr)
    saved = S.checkpoints(out)
    assert len(saved) == 1, saved
    step = saved[0][0]
    assert after <= step < STEPS
    assert f"interrupted: training interrupted after step {step}; saved " in stdout
    assert "resume_from='latest'" in stdout and "press Ctrl-C again to abort" in stderr
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 1))  # stopped at the boundary after the last logged step

    resumed = peftkit.adapter_state_dict(fit(out, resume="latest"))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_second_sigint_aborts_at_once_without_saving(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "aborted"
    pace = 1.5  # a step takes 3 s: stopping at its end would take far longer than an abort
    proc = _start(out, pace=pace)
    try:
        _wait_for_step(proc, out, 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 3, (stdout, stderr)
    assert stdout.strip() == "interrupted:", stdout  # the bare KeyboardInterrupt of an abort
    # The step in progress was neither finished (no record of step 2) nor saved; finishing it
    # would have taken about 2 * pace after the first signal.
    assert _steps_logged(out) == 1
    assert S.checkpoints(out) == []
    assert took < 2 * pace, f"the abort took {took:.1f} s"
    assert not list(out.glob(".checkpoint-*"))
