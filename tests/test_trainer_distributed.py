"""The Trainer under torchrun: two CPU processes (gloo) against one process on the combined batch;
and the FSDP2 loop of docs/trainer.md in the same processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit

import ddp_worker

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_match_each_other_and_one_process_on_the_combined_batch(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path / "ddp"),
        "2",  # per process: 2 micro-batches of 2 per step (no_sync on the first)
        "2",
    ]
    (tmp_path / "ddp").mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1)]
    histories = [json.loads((tmp_path / "ddp" / f"history{r}.json").read_text()) for r in (0, 1)]
    assert histories[0]["world"] == 2
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key  # DDP keeps the ranks identical
    shared = ("step", "loss", "lr", "grad_norm", "eval_loss", "eval_accuracy")
    for a, b in zip(histories[0]["history"], histories[1]["history"], strict=True):
        assert {k: a.get(k) for k in shared} == {k: b.get(k) for k in shared}  # reduced values

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    ddp_worker.run(single_dir, batch_size=8)  # the same 8 examples per step, in one batch
    single = load_file(str(single_dir / "rank0.safetensors"))
    for key, value in single.items():
        assert torch.allclose(value, ranks[0][key], atol=1e-5), key
    one = json.loads((single_dir / "history0.json").read_text())["history"]
    two = histories[0]["history"]
    for a, b in zip(one, two, strict=True):
        for name in ("loss", "eval_loss", "eval_accuracy"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-4), name

    # only rank 0 wrote: one log line per record, checkpoints present once
    lines = (tmp_path / "ddp" / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(two) == ddp_worker.STEPS + 2
    assert sorted(p.name for p in (tmp_path / "ddp" / "run").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    if not ddp_worker.FSDP2_ON_CPU:  # the DDP checks above passed; the FSDP2 half cannot run
        pytest.skip(f"FSDP2 on CPU needs CPU stream events, which torch {torch.__version__} lacks")
    _check_fsdp2(tmp_path / "ddp")


def _check_fsdp2(out: Path) -> None:
    """The documented FSDP2 loop: ranks agree and match one process on the combined batches."""
    ranks = [load_file(str(out / f"fsdp2_rank{r}.safetensors")) for r in (0, 1)]
    model = ddp_worker.lora_transformer()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    for ids in ddp_worker.fsdp2_batches(0, 1):
        peftkit.losses.causal_lm_loss(model(ids), ids).backward()
        opt.step()
        opt.zero_grad()
    for key, value in peftkit.adapter_state_dict(model).items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key], value, atol=1e-5), key
