"""Tiny runs shared by the Trainer corpus (test_trainer_*.py): a LoRA language model on the
learnable token sequences of trainer_data, and a small classifier on (features, label) pairs."""

from __future__ import annotations

import sys
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

LM = TaskLoss("causal_lm")


def lm_model(seed: int = 0, **lora: Any) -> nn.Module:
    """The tiny transformer LM with LoRA (r=2 on q_proj and v_proj unless ``lora`` says more)."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    peftkit.apply_lora(model, **{"r": 2, "targets": ["q_proj", "v_proj"], **lora})
    return model


def lm_config(out: Path | None = None, **kw: Any) -> TrainConfig:
    """16 sequences in batches of 4: 4 steps an epoch; a checkpoint every step."""
    fields: dict[str, Any] = {
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-2,
        "schedule": "constant",
        "eval_every": None,
        "save_every": 1 if out is not None else None,
        "save_total_limit": None,
        "output_dir": str(out) if out is not None else None,
        "progress": False,
    }
    return TrainConfig(**{**fields, **kw})


def lm_fit(
    model: nn.Module, config: TrainConfig, resume: Any = None, eval_data: Any = None
) -> Trainer:
    trainer = Trainer(model, config, loss_fn=LM)
    trainer.fit(lm_data(16), eval_data, resume_from=resume)
    return trainer


class Classifier(nn.Module):
    """(N, 4) features -> (N, 3) logits, or (N, 1) with ``classes=1``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def classifier(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = Classifier(classes)
    peftkit.apply_lora(model, r=2, targets=["fc"])
    return model


def pairs(labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, label) examples, one per label."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, generator=gen), y) for y in labels]


def adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.adapter_state_dict(model).items()}
