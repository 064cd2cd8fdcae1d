"""A two-process FSDP2 Trainer run killed hard (SIGKILL to both processes) after a checkpoint is on
disk, then resumed from the newest complete checkpoint by a new two-process launch, ends with the
adapter, optimiser state and RNG states of an uninterrupted run, bit for bit (CPU, gloo). A write
cut short (the temporary directory of a checkpoint) is never taken for a checkpoint. Resuming the
checkpoint in one process is refused, naming the number of processes to resume with.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsdp_kill_worker
from peftkit import Trainer
from peftkit.checkpoint import CheckpointError
from peftkit.training import state as S
from test_trainer_fsdp2 import _free_port, needs_fsdp2

from trainer_data import lora_transformer

HERE = Path(__file__).resolve().parent
WORLD = 2
KILL_AFTER = 3  # of fsdp_kill_worker.STEPS: mid-epoch
TENSOR_FILES = ("peftkit_model.safetensors", S.STATE_TENSORS)


def _launch(out: Path, delay: float, *dirs: Path) -> list[subprocess.Popen[bytes]]:
    """Both ranks as children of this process, in one new process group (rank 0's)."""
    port, group, procs = _free_port(), 0, []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        }
        command = [sys.executable, str(HERE / "fsdp_kill_worker.py"), str(delay), *map(str, dirs)]
        with open(out / f"rank{rank}-{len(list(out.glob('rank*')))}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda g=group: os.setpgid(0, g),  # type: ignore[misc]
                )
            )
        group = procs[0].pid
    return procs


def _logs(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(out.glob("rank*.log")))


def _wait(procs: list[subprocess.Popen[bytes]], out: Path, timeout: float = 400) -> None:
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, _logs(out)


def _kill_once_saved(procs: list[subprocess.Popen[bytes]], run: Path, out: Path) -> None:
    """SIGKILL the whole group as soon as checkpoint-KILL_AFTER is complete on disk."""
    deadline = time.monotonic() + 400
    while not (run / f"checkpoint-{KILL_AFTER}" / S.STATE_JSON).exists():
        assert all(p.poll() is None for p in procs), f"a rank ended early:\n{_logs(out)}"
        assert time.monotonic() < deadline, f"no checkpoint-{KILL_AFTER}:\n{_logs(out)}"
        time.sleep(0.01)
    os.killpg(procs[0].pid, signal.SIGKILL)
    assert [p.wait(timeout=60) for p in procs] == [-signal.SIGKILL] * WORLD


def _plant_cut_write(run: Path, newest: int) -> Path:
    """What a checkpoint write killed half-way leaves: its temporary directory, files truncated."""
    partial = run / f".checkpoint-{newest + 1}.0123456789abcdef.tmp"
    shutil.copytree(run / f"checkpoint-{newest}", partial, dirs_exist_ok=True)
    for path in partial.iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return partial


@needs_fsdp2
@pytest.mark.slow
def test_a_killed_fsdp2_run_resumes_bit_identically(tmp_path: Path, one_thread: None) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    _kill_once_saved(_launch(tmp_path, 0.15, killed), killed, tmp_path)

    complete = [step for step, _ in S.checkpoints(killed)]
    newest = complete[-1]
    assert KILL_AFTER <= newest < fsdp_kill_worker.STEPS, complete  # the run was cut short
    _plant_cut_write(killed, newest)
    stamp = (killed / f"checkpoint-{newest}" / S.STATE_JSON).stat().st_mtime_ns

    _wait(_launch(tmp_path, 0.0, killed, reference), tmp_path)  # resume, then an uninterrupted run
    # resumed from the newest complete checkpoint: that one is left as it was, the next rewritten
    assert (killed / f"checkpoint-{newest}" / S.STATE_JSON).stat().st_mtime_ns == stamp
    last = f"checkpoint-{fsdp_kill_worker.STEPS}"
    for name in TENSOR_FILES:  # adapter; optimiser moments, scheduler, every rank's RNG states
        resumed, uninterrupted = (load_file(str(d / last / name)) for d in (killed, reference))
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), name
    states = [S.read_state(d / last) for d in (killed, reference)]
    assert states[0]["progress"] == states[1]["progress"]
    assert states[0]["progress"]["step"] == fsdp_kill_worker.STEPS

    # the same checkpoint in one process: refused, naming the number of processes to resume with
    config = fsdp_kill_worker.config(tmp_path / "one")
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint-{KILL_AFTER} was written by a run of 2 process\(es\), this one has 1: "
        r".*Resume it with torchrun --nproc_per_node=2",
    ):
        Trainer(lora_transformer(), config).fit(
            fsdp_kill_worker.SlowData(0.0), resume_from=killed / f"checkpoint-{KILL_AFTER}"
        )
