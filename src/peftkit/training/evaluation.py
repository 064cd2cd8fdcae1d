"""Evaluation: loss and metrics over a dataset, sharded across processes.

Each process evaluates its share (rank r takes examples r, r + world, ...; no padding, so nothing is
counted twice); losses are summed and predictions gathered before the metrics are computed, so
every process returns the same numbers. ``evaluate`` takes what it needs (the model, the batches,
the loss, the metrics, the autocast context) rather than the Trainer, which composes it with
``eval_batches`` in ``Trainer.evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ..losses.functional import IGNORE_INDEX
from ..losses.tasks import forward, predictions
from . import data as D
from . import distributed

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Metrics = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]


def batch_size(batch: Any) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable):
        for value in values:
            size = batch_size(value)
            if size:
                return size
    return 0


def eval_batches(
    data: Any,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    num_workers: int,
    seed: int,
    where: distributed.Dist,
) -> tuple[Iterable[Any], bool]:
    """This process's batches of ``data`` and whether they are a shard (to be gathered)."""
    spec = D.loader_spec(data, batch_size, False, collate_fn, num_workers)
    if spec is None:
        return data, False
    spec = D.LoaderSpec(spec.dataset, spec.batch_size, False, spec.collate_fn, spec.num_workers)
    n = len(spec.dataset)
    sampler = D.ShardSampler(n, shuffle=False, rank=where.rank, world=where.world, pad=False)
    return D.build_loader(spec, sampler, seed=seed), where.active


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 with -100 where sequence lengths differ."""
    if not parts:
        return torch.empty(0, dtype=torch.long)
    if parts[0].ndim < 2:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    padded = [
        torch.nn.functional.pad(p, (0, width - p.shape[1]), value=IGNORE_INDEX)
        if p.ndim == 2
        else p
        for p in parts
    ]
    return torch.cat(padded)


def _loss_and_pairs(
    model: nn.Module, batch: Any, loss_fn: LossFn | None, task: str, want_pairs: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
        if not want_pairs:
            return loss, None
        fw = forward(model, batch, task)
    else:
        fw = forward(model, batch, task)
        loss = fw.loss
    return loss, predictions(fw, batch) if want_pairs else None


def _check_even(batches: Any, where: distributed.Dist) -> None:
    """FSDP2 gathers weights in every forward, so every process must run as many eval batches."""
    counts = distributed.gather(len(batches), where)
    if len(set(counts)) > 1:
        raise ValueError(
            f"under FSDP2 every process must evaluate as many batches, but the eval set splits into "
            f"{counts} batches per process; give eval_data a length that is a multiple of "
            "world size x eval_batch_size"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    metrics: Metrics | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    task: str = "auto",
    device: torch.device | None = None,
    gather: distributed.Dist | None = None,
    even: bool = False,
) -> dict[str, float]:
    """Mean loss (batches weighted by their size) and ``metrics(predictions, labels)`` over
    ``batches``, each moved to ``device`` and run under ``autocast()``.

    loss_fn(model, batch) -> scalar; None reads the model's own loss for ``task`` (the Trainer's
    default). gather: the processes whose shards ``batches`` is one of (losses summed, predictions
    gathered); None when ``batches`` is the whole set. even: every process must run as many batches
    (FSDP2 gathers weights in every forward).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    if gather is not None and even:
        _check_even(batches, gather)
    try:
        for batch in batches:
            n = batch_size(batch)
            on_device = D.to_device(batch, device) if device is not None else batch
            with autocast():
                loss, pair = _loss_and_pairs(model, on_device, loss_fn, task, metrics is not None)
            totals += torch.tensor([float(loss) * n, n], dtype=torch.float64)
            if pair is not None:
                preds.append(pair[0].cpu())
                labels.append(pair[1].cpu())
    finally:
        model.train(was_training)
    if gather is not None:
        on = totals.to(device) if device is not None else totals
        totals = distributed.mean(on, gather).cpu() * gather.world
        preds = [p for part in distributed.gather(preds, gather) for p in part]
        labels = [y for part in distributed.gather(labels, gather) for y in part]
    return _summary(totals, preds, labels, metrics)


def _summary(
    totals: torch.Tensor,
    preds: list[torch.Tensor],
    labels: list[torch.Tensor],
    metrics: Metrics | None,
) -> dict[str, float]:
    if not totals[1]:
        raise ValueError(
            "eval_data yielded no examples, so there is no loss to report; pass a non-empty eval "
            "set (a one-shot iterable is used up after one evaluation: pass a list or Dataset)"
        )
    out = {"loss": float(totals[0] / totals[1])}
    if metrics is not None and labels:
        out.update(metrics(concat(preds), concat(labels)))
    return out
