"""Run by tests/test_trainer_distributed.py under torchrun (and in-process for the single run).

Trains a LoRA'd TinyTransformer on a causal-LM task and writes the adapter tensors and the history
of this process to ``<out>/rank<r>.safetensors`` / ``history<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import peftkit
from peftkit import TrainConfig, Trainer

from trainer_data import lm_data, lora_transformer

STEPS = 4


def run(out: Path, batch_size: int, world: int = 1) -> Trainer:
    model = lora_transformer()
    config = TrainConfig(
        batch_size=batch_size,
        max_steps=STEPS,
        lr=1e-2,
        task="causal_lm",
        output_dir=str(out / "run"),
        eval_every=2,
        save_every=2,
        progress=False,
    )
    trainer = Trainer(model, config, compute_metrics=peftkit.metrics.classification_metrics)
    trainer.fit(lm_data(40), eval_data=lm_data(7, seed=3))
    rank = trainer.dist.rank
    tensors = {k: v.detach().contiguous() for k, v in peftkit.adapter_state_dict(model).items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    record: dict[str, Any] = {"history": trainer.history, "world": trainer.dist.world}
    (out / f"history{rank}.json").write_text(json.dumps(record))
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), batch_size=int(sys.argv[2]))
