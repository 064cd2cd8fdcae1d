"""The run of test_trainer_interrupt.py: ``python sigint_worker.py OUT PACE_S THREADS`` trains a
tiny LoRA language model (no periodic checkpoints: only an interrupted or finished run saves)
with each micro-batch paced by a sleep of PACE_S, so the test's SIGINT lands mid-run.

It prints ``interrupted: <message>`` and exits 3 when fit raises KeyboardInterrupt, ``finished``
when it returns. The test imports ``fit`` to run the same training in its own process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch import nn

from peftkit import TrainConfig, Trainer

from trainer_cases import LM, lm_model
from trainer_data import lm_data

STEPS = 12  # 24 sequences, batches of 4, 2 micro-batches a step: 3 steps an epoch, 4 epochs


def fit(out: Path, resume: str | None = None, loss_fn: Any = LM) -> nn.Module:
    model = lm_model(dropout=0.1)
    config = TrainConfig(
        max_steps=STEPS,
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        schedule="cosine",
        warmup_steps=2,
        eval_every=None,
        save_every=None,
        output_dir=str(out),
        progress=False,
    )
    Trainer(model, config, loss_fn=loss_fn).fit(lm_data(24), resume_from=resume)
    return model


if __name__ == "__main__":
    pace = float(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]))  # as the test process: the same float reductions

    def paced(model: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(pace)
        return LM(model, batch)

    try:
        fit(Path(sys.argv[1]), loss_fn=paced)
    except KeyboardInterrupt as err:
        print(f"interrupted: {err}", flush=True)
        sys.exit(3)
    print("finished", flush=True)
