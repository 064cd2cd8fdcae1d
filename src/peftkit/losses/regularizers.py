"""Penalties against catastrophic forgetting, as callables ``penalty(model) -> scalar tensor``.

Pass them to ``Trainer(regularizers=[...])`` (added to every step's loss) or add them in your own
loop. Both anchor the *trainable* parameters (the active adapters', or every parameter that requires
grad on a model without adapters), keyed by their structural names, so they survive a checkpoint
reload that replaces parameter objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core import adapter_state_dict, adapters
from .tasks import TaskLoss


def named_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by structural name (adapter checkpoint keys, or parameter names)."""
    if adapters(model):
        return {
            k: t
            for k, t in adapter_state_dict(model).items()
            if isinstance(t, nn.Parameter) and t.requires_grad
        }
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in params.items()}


class L2SP:
    """L2-SP (Li et al., 2018): (alpha / 2) * sum_i ||theta_i - theta0_i||^2.

    theta0 is each trainable parameter's value when the penalty is created: the pretrained weights
    for modules trained in full (``modules_to_save``, full fine-tuning), the initial adapter for
    adapter parameters (LoRA's B starts at 0, so pulling B back shrinks the update B A toward the
    pretrained weight). Unlike weight decay, which pulls toward 0, this keeps the starting point.
    """

    def __init__(self, model: nn.Module, *, alpha: float = 1e-2) -> None:
        self.alpha = alpha
        self.anchors = _snapshot(named_trainable(model))
        if not self.anchors:
            raise ValueError("L2SP: the model has no trainable parameters; apply an adapter first")

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = named_trainable(model)
        terms = [(params[k] - a.to(params[k])).pow(2).sum() for k, a in self.anchors.items()]
        return 0.5 * self.alpha * torch.stack(terms).sum()


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al., 2017): (lam / 2) sum_i F_i (theta_i - theta*_i)^2.

    theta* are the parameters after the previous task and F the diagonal of the empirical Fisher
    there. ``EWC.from_data`` estimates F as the mean over batches of the squared gradient of the
    batch loss (batches of one example give the per-example empirical Fisher).
    """

    def __init__(
        self, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], *, lam: float = 1.0
    ) -> None:
        if fisher.keys() != anchors.keys():
            raise ValueError("EWC: fisher and anchors must have the same parameter names")
        self.fisher, self.anchors, self.lam = fisher, anchors, lam

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        *,
        lam: float = 1.0,
    ) -> EWC:
        """Anchor the current parameters, with F estimated on ``batches`` of the previous task."""
        if loss_fn is None:
            loss_fn = TaskLoss()
        params = named_trainable(model)
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}
        count = 0
        for batch in batches:
            grads = torch.autograd.grad(
                loss_fn(model, batch), list(params.values()), allow_unused=True
            )
            for key, g in zip(params, grads, strict=True):
                if g is not None:
                    fisher[key] += g.detach().pow(2)
            count += 1
        if count == 0:
            raise ValueError("EWC.from_data needs at least one batch of the previous task")
        return cls({k: f / count for k, f in fisher.items()}, _snapshot(params), lam=lam)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = named_trainable(model)
        terms = [
            (self.fisher[k].to(params[k]) * (params[k] - a.to(params[k])).pow(2)).sum()
            for k, a in self.anchors.items()
        ]
        return 0.5 * self.lam * torch.stack(terms).sum()
