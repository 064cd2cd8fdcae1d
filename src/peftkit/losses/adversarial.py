"""Adversarial training on input embeddings: FGM (Miyato et al., 2017) and PGD (Madry et al., 2018).

With e the output of the input embedding and g the gradient of the loss with respect to it, each
example's embeddings are perturbed by

    FGM:  r = eps * g / ||g||                      (one extra forward/backward)
    PGD:  r_0 = alpha g / ||g||,  r_{k+1} = Proj_eps(r_k + alpha g_k / ||g_k||)   (K steps)

norms taken per example over all of its positions and features, and the model also trains on the
loss at e + r. The perturbation enters through a forward hook on the embedding module; the model's
code is untouched and nothing is added outside an attack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .._state import unwrap_model
from ..layers import AdapterLayer

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def find_input_embedding(model: nn.Module) -> nn.Module:
    """The module producing input embeddings: HF ``get_input_embeddings()``, else the first
    ``nn.Embedding`` (or adapter layer wrapping one) in module order."""
    inner = unwrap_model(model)
    getter = getattr(inner, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    for module in inner.modules():
        base = module.base_layer() if isinstance(module, AdapterLayer) else module
        if isinstance(base, nn.Embedding):
            return module
    raise ValueError(
        "adversarial training needs an input embedding and the model has no nn.Embedding; "
        "pass embedding=<module> to EmbeddingAttack"
    )


def per_example_unit(g: torch.Tensor) -> torch.Tensor:
    """g / ||g|| with the norm over everything but the first (batch) dimension."""
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    unit: torch.Tensor = g / norm.view(-1, *([1] * (g.ndim - 1)))
    return unit


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` scaled back onto the per-example L2 ball of radius ``epsilon`` where it leaves it."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (epsilon / norm).clamp(max=1.0)
    projected: torch.Tensor = delta * scale.view(-1, *([1] * (delta.ndim - 1)))
    return projected


class EmbeddingAttack:
    """FGM or PGD perturbations of ``embedding``'s output.

    Use in a step (the Trainer does this for ``TrainConfig(adversarial=...)``)::

        with attack.probe():                 # records d loss / d embeddings
            loss = loss_fn(model, batch)
        loss.backward()
        attack.loss(model, batch, loss_fn).backward()   # loss at the perturbed embeddings
    """

    def __init__(
        self,
        embedding: nn.Module,
        *,
        method: Literal["fgm", "pgd"] = "fgm",
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
    ) -> None:
        if method not in ("fgm", "pgd"):
            raise ValueError(f"method must be 'fgm' or 'pgd', got {method!r}")
        if epsilon <= 0 or alpha <= 0 or steps < 1:
            raise ValueError("epsilon and alpha must be positive and steps at least 1")
        self.method, self.epsilon, self.alpha, self.steps = method, epsilon, alpha, steps
        self.delta: torch.Tensor | None = None  # the probed (zero) perturbation; its .grad is read
        self._perturb: torch.Tensor | None = None
        self._probing = False
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._probing:
            self.delta = torch.zeros_like(output, requires_grad=True)
            return output + self.delta
        if self._perturb is not None:
            return output + self._perturb
        return None  # outside an attack the embedding's output is left alone

    @contextmanager
    def probe(self) -> Iterator[None]:
        """Within the block, forward passes add a zero perturbation whose gradient backward fills."""
        self._probing = True
        try:
            yield
        finally:
            self._probing = False

    def loss(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        """The loss at the adversarial embeddings (after a probed forward and its backward).

        PGD's inner steps run on ``unwrap_model(model)`` and only differentiate with respect to the
        perturbation, so they leave parameter gradients (and DDP) alone.
        """
        grad = self.delta.grad if self.delta is not None else None
        if grad is None:
            raise RuntimeError(
                "no gradient reached the input embeddings: call loss() after a backward of a loss "
                "computed inside attack.probe()"
            )
        step = self.epsilon if self.method == "fgm" else self.alpha
        delta = project(step * per_example_unit(grad), self.epsilon)
        inner = unwrap_model(model)
        try:
            for _ in range(self.steps - 1 if self.method == "pgd" else 0):
                self._perturb = delta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(loss_fn(inner, batch), self._perturb)
                delta = project(delta + self.alpha * per_example_unit(g), self.epsilon)
            self._perturb = delta.detach()
            return loss_fn(model, batch)
        finally:
            self._perturb = self.delta = None

    def remove(self) -> None:
        """Detach the hook from the embedding module."""
        self._handle.remove()
        self._perturb = self.delta = None
