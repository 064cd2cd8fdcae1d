"""Checks ``fit`` makes before the first step: each refuses (naming the fix) or warns about a run
that would otherwise end with a silent surprise: an output directory that cannot be written, an
evaluation that never runs, a method schedule the run cuts short, an empty eval set, a warm-up
longer than the run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import adapters
from .config import TrainConfig


def check_precision(config: TrainConfig, device: torch.device) -> None:
    """fp16 needs CUDA (a gradient scaler); bf16 on CUDA needs a GPU with bfloat16 support."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs CUDA (a gradient scaler); use 'bf16' on CPU")
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision='bf16': {device} does not support bfloat16; use precision='fp16' (with "
            "its gradient scaler) or 'fp32'"
        )


def check_output_dir(path: Path | None) -> None:
    """``output_dir`` must be a directory or not exist yet (a dangling symlink or a file is refused)."""
    if path is None:
        return
    if path.is_symlink() and not path.exists():
        raise ValueError(
            f"output_dir {path} is a symbolic link to {path.readlink()}, which does not exist; "
            "create the target directory or pass another output_dir"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} is a file; pass a directory (new or a run's)")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"output_dir {path} lies under {parent}, which is a file")


def check_eval_data(config: TrainConfig, eval_data: Any) -> None:
    """An eval set that is given must hold something (its mean loss would be NaN)."""
    if eval_data is None:
        if config.load_best_at_end:
            raise ValueError(
                "load_best_at_end needs eval_data: the best adapter is chosen by evaluation"
            )
        return
    if hasattr(eval_data, "__len__") and len(eval_data) == 0:
        raise ValueError(
            "eval_data is empty: pass examples to evaluate on, or leave it out "
            "(fit(train_data)) and set TrainConfig(eval_every=None)"
        )


def evaluations_planned(config: TrainConfig, total: int, per_epoch: int | None) -> bool | None:
    """Whether evaluation runs at least once in a run of ``total`` steps (None: cannot tell)."""
    every = config.eval_every
    if every is None:
        return False
    if isinstance(every, int):
        return every <= total
    if per_epoch is None:
        return None
    return total >= -(-per_epoch // config.grad_accum)  # at least one full epoch


def check_eval_plan(config: TrainConfig, eval_data: Any, total: int, per_epoch: int | None) -> None:
    """Refuse load_best_at_end when no evaluation would run; warn when eval_data goes unused."""
    if eval_data is None or evaluations_planned(config, total, per_epoch) is not False:
        return
    when = f"eval_every={config.eval_every!r}"
    problem = f"{when} never comes in this run of {total} optimiser steps"
    if config.eval_every is None:
        problem = "eval_every=None turns evaluation off"
    fix = "set eval_every to a number of steps within the run, or raise max_steps / epochs"
    if config.load_best_at_end:
        raise ValueError(f"load_best_at_end: {problem}, so no best adapter would exist; {fix}")
    if config.patience is not None:
        raise ValueError(f"patience: {problem}, so early stopping cannot work; {fix}")
    warnings.warn(f"eval_data will not be evaluated: {problem}; {fix}", UserWarning, stacklevel=3)


def check_schedules(model: nn.Module, total: int) -> None:
    """Every active adapter with a step schedule (``Method.planned_steps``) fits the run's length."""
    for name, method in adapters(model).items():
        planned = method.planned_steps() if method.active else None
        if planned is None or planned == total:
            continue
        what = (
            f"adapter {name!r} ({method.name}) plans its step schedule for {planned} optimiser "
            f"steps, but this run takes {total}"
        )
        if planned > total:
            raise ValueError(
                f"{what}: the schedule would be cut short (AdaLoRA: ranks never pruned to "
                f"target_r). Apply the adapter with a schedule of {total} steps (AdaLoRA: "
                f"total_steps={total}) or train for {planned} (TrainConfig(max_steps={planned}))"
            )
        warnings.warn(
            f"{what}: the schedule ends at step {planned} and the last {total - planned} steps "
            f"train with its final state (AdaLoRA: final ranks). Set it to {total} steps to "
            "spread it over the whole run",
            UserWarning,
            stacklevel=3,
        )


def check_warmup(config: TrainConfig, total: int) -> None:
    """A warm-up as long as the run never reaches the configured lr."""
    if config.warmup_steps and config.warmup_steps >= total:
        raise ValueError(
            f"warmup_steps={config.warmup_steps} is not shorter than the run ({total} optimiser "
            f"steps): lr would never reach {config.lr}. Lower warmup_steps, use warmup_ratio, or "
            "train for more steps"
        )


def check_accumulation(config: TrainConfig, per_epoch: int | None) -> None:
    """grad_accum larger than an epoch: every step averages fewer micro-batches than configured."""
    if per_epoch is not None and 0 < per_epoch < config.grad_accum:
        warnings.warn(
            f"grad_accum={config.grad_accum} exceeds the {per_epoch} micro-batches of an epoch: "
            f"each optimiser step averages {per_epoch}. Lower grad_accum or batch_size to get "
            "the effective batch you meant",
            UserWarning,
            stacklevel=3,
        )


def check_plan(
    model: nn.Module, config: TrainConfig, eval_data: Any, total: int, per_epoch: int | None
) -> None:
    """The checks that need the run's length (``total`` optimiser steps)."""
    check_eval_plan(config, eval_data, total, per_epoch)
    check_schedules(model, total)
    check_warmup(config, total)
    check_accumulation(config, per_epoch)


def data_ran_out(step: int, total: int) -> None:
    """A one-shot iterable of batches was exhausted at ``step`` of ``total``."""
    if step == 0:
        raise ValueError(
            "the training data yielded no batches; pass a non-empty Dataset, DataLoader or list"
        )
    warnings.warn(
        f"the training data ran out after {step} of {total} optimiser steps (a one-shot iterable "
        "such as a generator cannot be read twice); pass a list, Dataset or DataLoader to train "
        "for more than one pass",
        UserWarning,
        stacklevel=4,
    )
