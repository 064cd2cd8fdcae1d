"""Reliability corpus, crashes: a process killed with SIGKILL while saving a checkpoint leaves the
previous checkpoint (or the complete new one) loadable, never a mix of two saves.

A helper process forks children that save checkpoints back to back into one directory; the test
kills each child at a random moment and verifies the directory every time: it loads, every tensor
and the config come from one and the same save, and versions never go backwards. Kills that landed
mid-write are counted by the temporary files they leave (which loading ignores), so the test shows
it exercised the interesting moments. The default run kills 25 times; ``nox -s slow`` 300 times.

(A training run killed and resumed: test_kill_while_training.py.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit

WORKER = Path(__file__).with_name("save_loop_worker.py")


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(256, 256) for _ in range(4)))


def _loaded_version(directory: Path) -> tuple[int, bool]:
    """The single version the checkpoint holds, and whether loading warned about a stale config."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftkit.load_adapter(_fresh(), directory)
    tensors = list(peftkit.adapter_state_dict(model).values())
    value = tensors[0].flatten()[0].item()
    assert all(bool((t == value).all()) for t in tensors), "tensors from different saves"
    assert peftkit.adapters(model)["default"].config.alpha == value + 1, "config of another save"
    stale = any("does not match" in str(w.message) for w in caught)
    return int(value), stale


def _kill_rounds(directory: Path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    counts = {"mid_write": 0, "stale_config": 0, "newest": 0}
    try:
        assert proc.stdout.readline().strip() == "ready"
        last, leftovers = 0, set()
        for round_ in range(1, kills + 1):
            proc.stdin.write(f"{round_ * 10_000}\n")  # float32-exact up to 2**24
            proc.stdin.flush()
            pid = int(proc.stdout.readline().split()[1])
            time.sleep(rng.uniform(0.0, 0.08))
            os.kill(pid, signal.SIGKILL)
            status = int(proc.stdout.readline().split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            now = {p.name for p in directory.glob(".*.tmp")}
            counts["mid_write"] += bool(now - leftovers)
            leftovers = now
            version, stale = _loaded_version(directory)
            assert version >= last, f"round {round_}: went back from {last} to {version}"
            counts["stale_config"] += stale
            last = version
        counts["newest"] = last
    finally:
        proc.kill()
        proc.communicate()
    return counts


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(
    "kills",
    [pytest.param(25, id="25-kills"), pytest.param(300, id="300-kills", marks=pytest.mark.slow)],
)
def test_sigkill_while_saving_leaves_a_loadable_checkpoint(kills: int, tmp_path: Path) -> None:
    counts = _kill_rounds(tmp_path, kills, seed=kills)
    assert counts["newest"] > 0, "no save completed: the kills never overlapped saving"
    assert counts["mid_write"] > 0, f"no kill landed mid-write: {counts}"
