"""What a resumed run takes from its checkpoint, and what it must share with it.

- The model's set-up (adapter names, methods and configs) must be the run's: a resume never
  replaces the adapter a user applied with a different one from the checkpoint; it is refused,
  naming both set-ups.
- ``TrainConfig``: fields that give the saved state its meaning are refused when changed
  (``REFUSED``, plus the number of processes, ``grad_accum`` and the batch size checked by
  ``RunDirectory.read``); every other change is honoured from the resumed step on, with one
  warning that lists them. The optimiser's hyperparameters (lr, weight decay, betas, eps,
  momentum) always come from the config, never from the checkpoint.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, checkpoint_layout, read_checkpoint
from ..core import adapters
from ..registry import spec
from .config import TrainConfig
from .rundir import RunDirectory
from .state import STATE_JSON, load_weights

# Changing these would make the saved state mean something else: the optimiser's moments, the data
# order and RNG streams, the best metric so far, the gradient scaler.
REFUSED = ("optimizer", "seed", "metric_for_best", "greater_is_better")
_REQUIRED = ("progress", "optimizer", "scheduler", "scaler", "rng")
# Honoured without a word: they change no result (a run directory may be moved or copied).
QUIET = ("progress", "log_every", "num_workers", "output_dir")
_FIX = "start a new run in another output_dir, or set the model up as the run did"


def check_same_setup(model: nn.Module, directory: Path) -> None:
    """The model carries the adapters (names, methods, configs) the checkpoint was saved with."""
    layout = checkpoint_layout(directory)
    saved = _describe_saved(directory) if layout in ("peftkit", "peftkit-1") else {}
    now = {n: (m.name, m.config.to_dict()) for n, m in adapters(model).items()}
    if layout is None and not now:
        return  # a model without adapters: its trainable tensors are checked when loaded
    if saved == now:
        return
    raise CheckpointError(
        f"cannot resume from {directory}: the run trained {_setup(saved)}, the model carries "
        f"{_setup(now)}{_differences(saved, now)}. Resuming would replace the model's set-up with "
        f"the checkpoint's; {_FIX}"
    )


def _describe_saved(directory: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    doc, _ = read_checkpoint(directory)
    return {e["name"]: (e["method"], _normalised(e)) for e in doc["adapters"]}


def _normalised(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this version writes it (defaults for keys an older version lacked)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys: loading the adapter warns about them
            config = spec(entry["method"]).config_cls.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return dict(entry["config"])  # loading it reports what is wrong
    return config.to_dict()


def open_checkpoint(
    run_dir: RunDirectory,
    path: Path,
    model: nn.Module,
    config: TrainConfig,
    settings: dict[str, Any],
    total: int,
) -> dict[str, Any]:
    """Check ``path`` against this run, load its weights into ``model``; its training state."""
    state = run_dir.read(path, settings)
    lacking = [k for k in _REQUIRED if k not in state]
    if lacking:
        raise CheckpointError(
            f"{path / STATE_JSON} is not a Trainer's state (no {lacking}); resume from another "
            "checkpoint-N, or start a new run in another output_dir"
        )
    check_same_setup(model, path)
    check_step(path, state, total)
    check_config(path, state.get("config"), config)
    load_weights(model, path)
    run_dir.resume_log(int(state["progress"]["step"]))
    return state


def _setup(adapters_: dict[str, tuple[str, dict[str, Any]]]) -> str:
    if not adapters_:
        return "no adapter"
    return ", ".join(f"{method} adapter {name!r}" for name, (method, _) in adapters_.items())


def _differences(
    saved: dict[str, tuple[str, dict[str, Any]]], now: dict[str, tuple[str, dict[str, Any]]]
) -> str:
    """`` (adapter 'default': r 2 in the run, 4 in the model)`` for adapters present in both."""
    parts = []
    for name in saved.keys() & now.keys():
        (was_method, was), (is_method, cfg) = saved[name], now[name]
        if was_method != is_method:
            continue
        fields = sorted(k for k in was.keys() | cfg.keys() if was.get(k) != cfg.get(k))
        diffs = ", ".join(
            f"{k} {was.get(k)!r} in the run, {cfg.get(k)!r} in the model" for k in fields
        )
        parts.append(f"adapter {name!r}: {diffs}")
    return f" ({'; '.join(parts)})" if parts else ""


def config_changes(
    saved: dict[str, Any] | None, config: TrainConfig
) -> tuple[list[str], list[str]]:
    """(refused, honoured) changes of the config since the checkpoint, as ``"lr 0.001 -> 0.01"``."""
    if not saved:
        return [], []  # a checkpoint without its config: nothing to compare
    now = config.to_dict()
    refused, honoured = [], []
    for key, value in now.items():
        if key not in saved or saved[key] == value or key in QUIET:
            continue
        change = f"{key} {saved[key]!r} -> {value!r}"
        fp16 = key == "precision" and "fp16" in (saved[key], value)  # the scaler's state
        if key in REFUSED or fp16:
            refused.append(change)
        elif key not in ("grad_accum", "batch_size"):  # checked with the run's settings
            honoured.append(change)
    return refused, honoured


def check_config(path: Path, saved: dict[str, Any] | None, config: TrainConfig) -> None:
    """Refuse changes the saved state cannot follow; warn once about the ones honoured."""
    refused, honoured = config_changes(saved, config)
    if refused:
        raise CheckpointError(
            f"cannot resume from {path} with a changed {', '.join(refused)}: the saved optimiser "
            "state, data order or best metric belong to the old value. Resume with the run's "
            "value, or start a new run in another output_dir"
        )
    if honoured:
        warnings.warn(
            f"resuming from {path} with changed settings, honoured from this step on: "
            f"{', '.join(honoured)}",
            UserWarning,
            stacklevel=5,
        )


def check_step(path: Path, state: dict[str, Any], total: int) -> None:
    """The directory's name agrees with the step it holds, and the run has steps left to take."""
    step = int(state["progress"]["step"])
    named = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(
            f"{path} holds the training state of step {step}, not {named.group(1)} (renamed or "
            f"copied from another run?); rename it checkpoint-{step}, or resume from another one"
        )
    if step > total:
        raise ValueError(
            f"{path} is at step {step}, past this run's {total} optimiser steps; raise "
            "max_steps / epochs to train further, or start a new run"
        )


def fresh_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The config's hyperparameters of each param group (taken before a saved state is loaded)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    fresh: list[dict[str, Any]],
) -> None:
    """Give the restored optimiser the config's hyperparameters; lr follows the schedule from the
    restored step (the same floats as the saved ones when nothing changed)."""
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, base, schedule in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() returns


def check_same_parameters(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The saved optimiser state fits the reloaded model's trainable tensors, or a clear error."""
    was = [len(g["params"]) for g in saved["param_groups"]]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if was != now:
        raise CheckpointError(
            f"cannot resume: the checkpoint's optimiser state holds {sum(was)} trainable tensors "
            f"(groups {was}), the reloaded model trains {sum(now)} (groups {now}). The adapters "
            "changed since the run was saved, or a method saves its adapter in another form than it "
            "trains in (prefix-tuning with mlp_hidden saves the folded prefix, not its MLP). Start "
            "a fresh run; for a resumable prefix run, train it without mlp_hidden"
        )
