"""The training run of test_kill_while_training.py; run as a script it is the run that gets killed.

``python train_worker.py OUT THREADS`` trains (checkpoint every step into OUT) until the test
SIGKILLs it; each micro-batch is paced by a short sleep so the kill lands mid-run. The test imports
``fit`` to run the same training uninterrupted and to resume the killed one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: trainer_data, zoo

import torch
from torch import nn

import peftkit
from peftkit import TrainConfig, Trainer
from peftkit.training.tasks import TaskLoss

from trainer_data import lm_data
from zoo import TinyTransformer

STEPS = 9  # 24 sequences, batches of 4, 2 micro-batches per step: 3 steps an epoch, 3 epochs
PACE_S = 0.03  # sleep per micro-batch in the killed run (does not change any number)
LOSS = TaskLoss("causal_lm")


def fit(out: Path, resume: str | None = None, loss_fn: Any = LOSS) -> nn.Module:
    """The run: a tiny plain-torch transformer LM with LoRA (dropout 0.1, so the RNG state matters)
    and a trained head, AdamW with warm-up and a cosine schedule."""
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply_lora(
        model, r=4, dropout=0.1, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    config = TrainConfig(
        epochs=3,
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        schedule="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        save_every=1,
        save_total_limit=None,
        output_dir=str(out),
        progress=False,
    )
    Trainer(model, config, loss_fn=loss_fn).fit(lm_data(24), resume_from=resume)
    return model


def paced(model: nn.Module, batch: Any) -> torch.Tensor:
    time.sleep(PACE_S)
    return LOSS(model, batch)


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))  # as the test process: same float reductions
    fit(Path(sys.argv[1]), loss_fn=paced)
    print("finished", flush=True)
