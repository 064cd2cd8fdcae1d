"""Reliability corpus, crashes: a training run killed with SIGKILL mid-run and resumed with
``Trainer.fit(resume_from="latest")`` ends with the same weights, bit for bit (CPU), as a run that
never stopped.

The run (train_worker.py: a tiny transformer LM with LoRA dropout and a trained head, AdamW with a
cosine schedule, 2 micro-batches a step, a checkpoint every step) is a real process; the test kills
it at a random moment after its second checkpoint, so the kill may land mid-step or mid-save. The
resumed run starts from the newest complete checkpoint (weights, optimiser, schedule, data order
and RNG states) and must match the uninterrupted run exactly.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.training import state as S

from train_worker import STEPS, fit

WORKER = Path(__file__).with_name("train_worker.py")


def _kill_mid_run(out: Path, seed: int) -> int:
    """Start the run, SIGKILL it a random moment after its second checkpoint; the newest step."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(torch.get_num_threads())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not S.checkpoints(out) or S.checkpoints(out)[-1][0] < 2:
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and "finished" not in stdout
    return int(S.checkpoints(out)[-1][0])


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, one_thread: None
) -> None:
    newest = _kill_mid_run(tmp_path / "killed", seed=0)
    assert 2 <= newest < STEPS, f"not killed mid-run (newest checkpoint {newest} of {STEPS})"
    resumed = fit(tmp_path / "killed", resume="latest")
    expected = peftkit.adapter_state_dict(fit(tmp_path / "uninterrupted"))
    got = peftkit.adapter_state_dict(resumed)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert S.checkpoints(tmp_path / "killed")[-1][0] == STEPS
