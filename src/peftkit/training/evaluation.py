"""Evaluation for the Trainer: loss and metrics over a dataset, sharded across processes.

Each process evaluates its share (rank r takes examples r, r + world, ...; no padding, so nothing is
counted twice); losses are summed and predictions gathered before the metrics are computed, so
every process returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import _sharding
from ..losses.functional import IGNORE_INDEX
from . import data as D
from . import distributed
from .tasks import forward, predictions

if TYPE_CHECKING:
    from ..trainer import Trainer


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


def eval_batches(trainer: Trainer, data: Any) -> tuple[Iterable[Any], bool]:
    """This process's batches of ``data`` and whether they are a shard (to be gathered)."""
    cfg, where = trainer.config, trainer.dist
    size = cfg.eval_batch_size or cfg.batch_size
    spec = D.loader_spec(data, size, False, trainer.collate_fn, cfg.num_workers)
    if spec is None:
        return data, False
    spec = D.LoaderSpec(spec.dataset, spec.batch_size, False, spec.collate_fn, spec.num_workers)
    n = len(spec.dataset)
    sampler = D.ShardSampler(n, shuffle=False, rank=where.rank, world=where.world, pad=False)
    return D.build_loader(spec, sampler, seed=cfg.seed), where.active


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
    trainer: Trainer, batch: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    want_pairs = trainer.compute_metrics is not None
    if trainer.custom_loss:
        loss = trainer.loss_fn(trainer.model, batch)
        if not want_pairs:
            return loss, None
        fw = forward(trainer.model, batch, trainer.config.task)
    else:
        fw = forward(trainer.model, batch, trainer.config.task)
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
def evaluate(trainer: Trainer, data: Any) -> dict[str, float]:
    """Mean loss (batches weighted by their size) and ``trainer.compute_metrics`` over ``data``."""
    model, where = trainer.model, trainer.dist
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    batches, sharded = eval_batches(trainer, data)
    if sharded and _sharding.is_fsdp2(trainer.raw):
        _check_even(batches, where)
    try:
        for batch in batches:
            n = batch_size(batch)
            with trainer._autocast():
                loss, pair = _loss_and_pairs(trainer, D.to_device(batch, trainer.device))
            totals += torch.tensor([float(loss) * n, n], dtype=torch.float64)
            if pair is not None:
                preds.append(pair[0].cpu())
                labels.append(pair[1].cpu())
    finally:
        model.train(was_training)
    if sharded:
        totals = distributed.mean(totals.to(trainer.device), where).cpu() * where.world
        preds = [p for part in distributed.gather(preds, where) for p in part]
        labels = [y for part in distributed.gather(labels, where) for y in part]
    if not totals[1]:
        raise ValueError(
            "eval_data yielded no examples, so there is no loss to report; pass a non-empty eval "
            "set (a one-shot iterable is used up after one evaluation: pass a list or Dataset)"
        )
    metrics = {"loss": float(totals[0] / totals[1])}
    if trainer.compute_metrics is not None and labels:
        metrics.update(trainer.compute_metrics(concat(preds), concat(labels)))
    return metrics
