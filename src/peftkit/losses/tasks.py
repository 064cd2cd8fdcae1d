"""From a batch to a loss, and to predictions for metrics.

Batches may be HF-style dicts (``input_ids``, ``attention_mask``, ``labels``...), ``(inputs,
labels)`` pairs, or a bare tensor of token ids. A model that computes its own loss from ``labels``
(every HF ``...For...`` model) is trusted; otherwise the loss follows the task:

- ``classification``: cross-entropy over the last dim of the logits; covers sequence classification
  (N, C) and token classification (N, T, C), with label -100 ignored;
- ``causal_lm``: next-token cross-entropy (labels, or ``input_ids`` when the batch has none);
- ``regression``: MSE (a one-output head); ``multi_label``: BCE on logits.

``auto`` picks: no labels -> causal_lm; float labels -> regression (one output) or multi_label;
integer labels -> classification.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._state import unwrap_model
from .functional import (
    IGNORE_INDEX,
    binary_cross_entropy,
    causal_lm_loss,
    cross_entropy,
    mse,
)


@dataclass
class Forward:
    """One forward pass: the loss, the logits (if any), the labels and the task that was used."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    task: str


_ACCEPTS_LABELS: dict[type[nn.Module], bool] = {}


def _accepts_labels(cls: type[nn.Module]) -> bool:
    """Whether ``cls.forward`` takes ``labels`` (by name or through ``**kwargs``); cached per class."""
    if cls not in _ACCEPTS_LABELS:
        params = inspect.signature(cls.forward).parameters.values()
        _ACCEPTS_LABELS[cls] = any(p.name == "labels" or p.kind is p.VAR_KEYWORD for p in params)
    return _ACCEPTS_LABELS[cls]


def split_batch(
    model: nn.Module, batch: Any
) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor | None]:
    """(positional args, keyword args, labels) for calling ``model`` on ``batch``."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        labels = kwargs.get("labels")
        if labels is not None and not _accepts_labels(type(unwrap_model(model))):
            del kwargs["labels"]
        return (), kwargs, labels
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, labels = batch
        if isinstance(inputs, Mapping):
            return (), dict(inputs), labels
        return (inputs,), {}, labels
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}: use a dict of tensors, an "
        "(inputs, labels) pair or a tensor, or pass loss_fn=... to the Trainer"
    )


def read_output(out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, logits) from a model output: a tensor, an HF ModelOutput, a dict or a tuple."""
    if isinstance(out, torch.Tensor):
        return None, out
    if isinstance(out, Mapping):
        return out.get("loss"), out.get("logits")
    if hasattr(out, "logits"):
        return getattr(out, "loss", None), out.logits
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return None, out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def resolve_task(task: str, logits: torch.Tensor | None, labels: torch.Tensor | None) -> str:
    if task != "auto":
        return task
    if labels is None:
        return "causal_lm"
    if labels.is_floating_point():
        one_output = logits is not None and logits.shape[-1] == 1
        return "regression" if one_output else "multi_label"
    return "classification"


def task_loss(
    task: str, logits: torch.Tensor, labels: torch.Tensor | None, batch: Any
) -> torch.Tensor:
    """The loss of ``task`` for model ``logits`` on ``batch`` (see the module docstring)."""
    if task == "causal_lm":
        ids = labels if labels is not None else _get(batch, "input_ids")
        if ids is None:
            raise ValueError("a causal-LM batch needs 'input_ids' or 'labels'")
        return causal_lm_loss(logits, ids, _get(batch, "attention_mask"))
    if labels is None:
        raise ValueError(
            "the batch has no labels: add a 'labels' entry (or an (inputs, labels) pair), set "
            "TrainConfig(task='causal_lm') for language modelling, or pass loss_fn=..."
        )
    check_labels(task, logits, labels)
    if task == "regression":
        return mse(logits, labels)
    if task == "multi_label":
        return binary_cross_entropy(logits, labels)
    return cross_entropy(logits, labels)


_EXPECTS = {
    "classification": "integer class indices shaped like the logits without their last dim",
    "regression": "float targets of shape (N,) for a one-output head, or shaped like the logits",
    "multi_label": "0/1 float targets shaped like the logits",
}


def check_labels(task: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Labels that fit ``task`` and ``logits``, or a ValueError naming both shapes and dtypes."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be a tensor, got {type(labels).__name__}; batch them with torch's "
            "default collation, or convert them with torch.tensor(...)"
        )
    shape, want = tuple(labels.shape), tuple(logits.shape)
    if task == "classification":
        ok_dtype = not labels.is_floating_point() and labels.dtype != torch.bool
        ok_shape, fix = shape == want[:-1], "labels.long()" if not ok_dtype else ""
    elif task == "regression":
        ok_dtype = labels.is_floating_point()
        ok_shape = shape == want or (want[-1:] == (1,) and shape == want[:-1])
        fix = "labels.float()"
    else:
        ok_dtype, ok_shape, fix = True, shape == want, ""
    if ok_dtype and ok_shape:
        return
    hint = f"; convert them ({fix})" if fix and not ok_dtype else ""
    raise ValueError(
        f"labels of shape {shape} and dtype {labels.dtype} do not fit logits of shape {want} "
        f"for task {task!r}, which expects {_EXPECTS[task]}{hint}. Fix the labels, set "
        "TrainConfig(task=...) to the task you mean, or pass loss_fn=..."
    )


def _get(batch: Any, key: str) -> torch.Tensor | None:
    value = batch.get(key) if isinstance(batch, Mapping) else None
    if value is None and key == "input_ids" and isinstance(batch, torch.Tensor):
        return batch
    return value if isinstance(value, torch.Tensor) else None


def forward(model: nn.Module, batch: Any, task: str = "auto") -> Forward:
    """Run ``model`` on ``batch``; use the model's own loss or compute the task's."""
    args, kwargs, labels = split_batch(model, batch)
    loss, logits = read_output(model(*args, **kwargs))
    resolved = resolve_task(task, logits, labels)
    if loss is None:
        if logits is None:
            raise ValueError("the model returned neither a loss nor logits; pass loss_fn=...")
        loss = task_loss(resolved, logits, labels, batch)
    return Forward(loss, logits, labels, resolved)


class TaskLoss:
    """The Trainer's default ``loss_fn(model, batch)``: ``forward(model, batch, task).loss``."""

    def __init__(self, task: str = "auto") -> None:
        self.task = task

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return forward(model, batch, self.task).loss


def predictions(fw: Forward, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(predictions, labels) aligned for metrics, or None when there is nothing to compare."""
    logits, labels = fw.logits, fw.labels
    if logits is None:
        return None
    if fw.task == "causal_lm":
        ids = labels if labels is not None else _get(batch, "input_ids")
        if ids is None:
            return None
        mask = _get(batch, "attention_mask")
        if mask is not None:
            ids = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return logits[:, :-1].argmax(-1), ids[:, 1:]
    if labels is None:
        return None
    if fw.task == "regression":
        return logits.float().reshape(labels.shape), labels
    if fw.task == "multi_label":
        return (logits > 0).long(), labels.long()
    return logits.argmax(-1), labels
