"""One rank of a two-process FSDP2 Trainer run, started by tests/test_fsdp2_kill_resume.py.

``python fsdp_kill_worker.py DELAY DIR [DIR ...]``, with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment (the test starts the ranks itself, in one process group, so it can
SIGKILL them together). For each DIR: a LoRA'd TinyTransformer the process shards with
``fully_shard`` trains ``STEPS`` optimiser steps into DIR with a checkpoint after every step,
resuming from the newest complete checkpoint there (``resume_from="latest"``). Reading an example
sleeps DELAY seconds, so a run lasts long enough to be killed part-way; the sleep changes no number.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fsdp_worker import shard
from peftkit import TrainConfig, Trainer

from trainer_data import lm_data, lora_transformer

STEPS = 8


class SlowData(Dataset[torch.Tensor]):
    """``lm_data(40)`` (5 optimiser steps an epoch), each example read after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.rows, self.delay = lm_data(40), delay

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay)
        return self.rows[index]


def config(out: Path) -> TrainConfig:
    return TrainConfig(
        batch_size=2,
        grad_accum=2,
        max_steps=STEPS,
        lr=1e-2,
        max_grad_norm=0.05,  # clipping acts on every step
        task="causal_lm",
        output_dir=str(out),
        save_every=1,
        save_total_limit=None,
        progress=False,
    )


def run(out: Path, delay: float) -> None:
    model = shard(lora_transformer())
    Trainer(model, config(out)).fit(SlowData(delay), resume_from="latest")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for directory in sys.argv[2:]:
        run(Path(directory), float(sys.argv[1]))
