"""Losses that need the model and the batch: R-Drop and knowledge distillation.

Each is a ``loss_fn(model, batch) -> scalar`` for ``Trainer(loss_fn=...)`` or a hand-written loop;
the task part of the loss is the Trainer's default (see ``peftkit.losses.tasks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import tasks
from .functional import IGNORE_INDEX, distillation_kl, symmetric_kl


def _positions(fw: tasks.Forward) -> torch.Tensor | None:
    """Which positions of the logits count for a KL term (token labels other than -100)."""
    if fw.logits is None or fw.labels is None or fw.labels.is_floating_point():
        return None
    if fw.labels.shape == fw.logits.shape[:-1]:
        return fw.labels != IGNORE_INDEX
    return None


def doubled(batch: Any) -> Any:
    """``batch`` concatenated with itself along dim 0 (tensors only; other entries kept)."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch])
    if isinstance(batch, Mapping):
        return {k: doubled(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(doubled(v) for v in batch)
    return batch


class RDropLoss:
    """R-Drop (Liang et al., 2021): the batch passes twice (different dropout masks), and

        loss = (task(a) + task(b)) / 2 + alpha * (KL(a || b) + KL(b || a)) / 2

    The two passes are one forward of the batch concatenated with itself: one call of the model,
    so it works unchanged under DDP. Without dropout in the model the KL term is zero.
    """

    def __init__(self, alpha: float = 1.0, task: str = "auto") -> None:
        self.alpha, self.task = alpha, task

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        fw = tasks.forward(model, doubled(batch), self.task)
        if fw.logits is None:
            raise ValueError("R-Drop needs the model's logits")
        a, b = fw.logits.chunk(2)
        mask = _positions(fw)
        kl = symmetric_kl(a, b, mask=None if mask is None else mask.chunk(2)[0])
        return fw.loss + self.alpha * kl


class DistillationLoss:
    """Knowledge distillation: (1 - alpha) * task loss + alpha * T^2 KL(teacher_T || student_T).

    The teacher runs without gradients on the same batch; keep it on the student's device and in
    eval mode. Token-level tasks compare only positions whose label is not -100.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        task: str = "auto",
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.teacher, self.temperature, self.alpha, self.task = teacher, temperature, alpha, task

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        student = tasks.forward(model, batch, self.task)
        with torch.no_grad():
            teacher = tasks.forward(self.teacher, batch, self.task)
        if student.logits is None or teacher.logits is None:
            raise ValueError("distillation needs logits from both student and teacher")
        kd = distillation_kl(
            student.logits, teacher.logits, temperature=self.temperature, mask=_positions(student)
        )
        return (1 - self.alpha) * student.loss + self.alpha * kd
