"""Losses as pure tensor functions. Shapes: logits (..., C), integer labels (...).

Every classification loss flattens the leading dimensions, so sequence classification (N, C) and
token classification / language modelling (N, T, C) use the same function. ``ignore_index`` marks
positions that count neither in the sum nor in the mean's denominator.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]
IGNORE_INDEX = -100


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not fit logits of shape "
            f"{tuple(logits.shape)} (expected labels of shape {tuple(logits.shape[:-1])}); "
            "for a causal LM use causal_lm_loss / TrainConfig(task='causal_lm')"
        )


def _reduce(values: torch.Tensor, keep: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Reduce per-position ``values`` over the positions where ``keep`` is True."""
    values = values * keep
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / keep.sum().clamp(min=1)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """-log softmax(logits)[label], with label smoothing eps: (1 - eps) CE + eps * mean_c(-log p_c).

    The mean is over positions whose label is not ``ignore_index`` (weighted by ``weight[label]``
    when class weights are given, as torch does). ``reduction="none"`` keeps the shape of ``labels``.
    """
    _check_labels(logits, labels)
    out = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return out.view(labels.shape) if reduction == "none" else out


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token cross-entropy: logits (N, T, V) at t predict labels (N, T) at t + 1.

    Positions where ``attention_mask`` is 0 (padding) are ignored as targets.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    return cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index)


def binary_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    pos_weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """-[y log s(x) + (1 - y) log(1 - s(x))] on logits x (multi-label: one sigmoid per class)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction=reduction
    )


def mse(pred: torch.Tensor, target: torch.Tensor, *, reduction: Reduction = "mean") -> torch.Tensor:
    """(pred - target)^2; pred (N, 1) against target (N,) is accepted (a regression head)."""
    if pred.ndim == target.ndim + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred.float(), target.float(), reduction=reduction)


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): -alpha[y] (1 - p_y)^gamma log p_y; gamma = 0 is cross-entropy.

    ``alpha`` is an optional per-class weight (C,). The mean is over non-ignored positions.
    """
    _check_labels(logits, labels)
    keep = labels != ignore_index
    safe = labels.masked_fill(~keep, 0)
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if alpha is not None:
        loss = loss * alpha.to(loss)[safe]
    return _reduce(loss, keep, reduction)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Binary / multi-label focal loss: -a_t (1 - p_t)^gamma log p_t with p_t = s(x) if y else 1 - s(x)."""
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    p = torch.sigmoid(logits.float())
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = (1 - p_t) ** gamma * bce
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def kl_divergence(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p || q) with p = softmax(logits_p / T), q = softmax(logits_q / T), averaged over positions.

    Positions are all leading dimensions; ``mask`` (leading shape, True = count) drops padding.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits {tuple(logits_p.shape)} and {tuple(logits_q.shape)} differ")
    log_p = torch.log_softmax(logits_p.float() / temperature, dim=-1)
    log_q = torch.log_softmax(logits_q.float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = torch.ones_like(per_position, dtype=torch.bool) if mask is None else mask.bool()
    return _reduce(per_position, keep, "mean")


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): T^2 KL(softmax(t / T) || softmax(s / T)).

    The T^2 factor keeps gradient magnitudes comparable across temperatures. The teacher is detached.
    """
    kl = kl_divergence(teacher_logits.detach(), student_logits, temperature=temperature, mask=mask)
    return temperature**2 * kl


def symmetric_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """R-Drop's consistency term (Liang et al., 2021): (KL(a || b) + KL(b || a)) / 2."""
    return 0.5 * (
        kl_divergence(logits_a, logits_b, mask=mask) + kl_divergence(logits_b, logits_a, mask=mask)
    )
