"""``TrainConfig``: every setting of a training run, validated up front.

A frozen, keyword-only dataclass like the method configs: ``__post_init__`` raises a ``ValueError``
that names the fix and never rewrites a field. ``to_dict`` gives the JSON form stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Literal

from ..config import check_finite_number, check_positive_int

OptimizerName = Literal["adamw", "sgd", "adafactor"]
ScheduleName = Literal["constant", "linear", "cosine"]
Precision = Literal["fp32", "bf16", "fp16"]
TaskName = Literal["auto", "classification", "causal_lm", "regression", "multi_label"]
Every = int | Literal["epoch"] | None

_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": ("adamw", "sgd", "adafactor"),
    "schedule": ("constant", "linear", "cosine"),
    "precision": ("fp32", "bf16", "fp16"),
    "task": ("auto", "classification", "causal_lm", "regression", "multi_label"),
    "on_nonfinite": ("error", "skip"),
    "adversarial": (None, "fgm", "pgd"),
    "distributed": ("auto", "fsdp2"),
}

# What a user of transformers' TrainingArguments writes by habit, and TrainConfig's name for it.
_HF_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "schedule",
    "optim": "optimizer",
    "fp16": "precision",
    "bf16": "precision",
    "eval_steps": "eval_every",
    "eval_strategy": "eval_every",
    "evaluation_strategy": "eval_every",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "load_best_model_at_end": "load_best_at_end",
    "early_stopping_patience": "patience",
    "dataloader_num_workers": "num_workers",
}

# Switches: a string such as "false" is truthy, so anything but a bool is refused.
_FLAGS = (
    "gradient_checkpointing",
    "compile",
    "load_best_at_end",
    "progress",
    "find_unused_parameters",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of one training run (all optional).

    Length: ``epochs`` passes over the data, or exactly ``max_steps`` optimiser steps when set.
        ``batch_size`` applies when ``fit`` gets a Dataset (a DataLoader keeps its own);
        ``grad_accum`` micro-batches make one optimiser step.
    Optimiser: ``"adamw"`` (decoupled ``weight_decay`` on matrices only: never biases or norm
        weights), ``"sgd"`` (``momentum``) or ``"adafactor"``; ``lr`` (None: the default the
        model's methods declare, chosen when ``fit`` starts and said once on stderr; see
        docs/trainer.md) follows ``schedule`` (``"constant"``, ``"linear"`` or ``"cosine"`` decay
        to ``min_lr_ratio * lr``) after ``warmup_steps`` (or ``warmup_ratio`` of the run) of
        linear warm-up. Gradients are clipped to ``max_grad_norm`` (None: no clipping).
    Numerics: ``precision`` ``"bf16"`` autocasts (CPU and CUDA); ``"fp16"`` autocasts with a gradient
        scaler (CUDA only). ``gradient_checkpointing`` for HF models; ``compile`` wraps the model
        in ``torch.compile``. A non-finite loss raises (``on_nonfinite="error"``) or skips the step.
    Task: how batches become a loss when no ``loss_fn`` is given (see docs/trainer.md); ``"auto"``
        reads it from the outputs and labels. ``adversarial`` adds FGM or PGD training on the input
        embeddings (radius ``adv_epsilon``, PGD step ``adv_alpha`` x ``adv_steps``).
    Evaluation: every ``eval_every`` steps or each ``"epoch"``; ``metric_for_best`` (an eval
        metric name such as ``"loss"`` or ``"accuracy"``) picks the best checkpoint; training stops
        after ``patience`` evaluations without an improvement larger than ``min_delta``.
        ``greater_is_better`` defaults to False for names ending in "loss", True otherwise.
    Output: ``output_dir`` receives checkpoints every ``save_every`` steps (or ``"epoch"``; the
        last ``save_total_limit`` are kept), ``best/`` (the best adapter) and ``log.jsonl``. Nothing
        is written without it. ``load_best_at_end`` loads the best adapter when training ends.
    Distributed (under torchrun): ``"auto"`` wraps a plain model in DDP and trains a model sharded
        with FSDP2 as it is; ``"fsdp2"`` makes the Trainer broadcast rank 0's weights and shard the
        model with FSDP2 itself, per block: the classes named in ``shard_modules``, else an HF
        model's ``_no_split_modules``. See docs/trainer.md, "FSDP2".
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1

    optimizer: OptimizerName = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: ScheduleName = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0

    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    on_nonfinite: Literal["error", "skip"] = "error"

    task: TaskName = "auto"
    adversarial: Literal["fgm", "pgd"] | None = None
    adv_epsilon: float = 1.0
    adv_alpha: float = 0.3
    adv_steps: int = 3

    eval_every: Every = "epoch"
    metric_for_best: str = "loss"
    greater_is_better: bool | None = None
    patience: int | None = None
    min_delta: float = 0.0

    output_dir: str | os.PathLike[str] | None = None
    save_every: Every = "epoch"
    save_total_limit: int | None = 2
    load_best_at_end: bool = False
    log_every: int = 1
    progress: bool = True

    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    find_unused_parameters: bool = False
    distributed: Literal["auto", "fsdp2"] = "auto"
    shard_modules: tuple[str, ...] = ()

    def __new__(cls, *args: Any, **fields: Any) -> TrainConfig:
        """Refuse a keyword TrainConfig has no field for, naming the field to use instead."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in fields if k not in names]
        if unknown:
            raise TypeError("\n".join(_unknown_field(key, fields[key], names) for key in unknown))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self._check_flags()
        self._check_length()
        self._check_optimizer()
        self._check_evaluation()
        self._check_rest()

    def _check_flags(self) -> None:
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise ValueError(
                f"greater_is_better must be True, False or None, got {self.greater_is_better!r}"
            )

    def _check_length(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("grad_accum", self.grad_accum)
        for name in ("max_steps", "eval_batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))

    def _check_optimizer(self) -> None:
        if self.lr is not None:
            check_finite_number("lr", self.lr, positive=True)
        check_finite_number("eps", self.eps, positive=True)
        for name in ("weight_decay", "momentum", "min_lr_ratio", "warmup_ratio"):
            check_finite_number(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_lr_ratio > 1 or self.warmup_ratio >= 1:
            raise ValueError("min_lr_ratio must be <= 1 and warmup_ratio < 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.warmup_ratio):
            raise ValueError("set warmup_steps (>= 0) or warmup_ratio, not both")
        if self.max_grad_norm is not None:
            check_finite_number("max_grad_norm", self.max_grad_norm, positive=True)

    def _check_evaluation(self) -> None:
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value != "epoch":
                check_positive_int(f"{name} (steps, 'epoch' or None)", value)
        if self.patience is not None:
            check_positive_int("patience", self.patience)
        check_finite_number("min_delta", self.min_delta)
        if not isinstance(self.metric_for_best, str) or not self.metric_for_best:
            raise ValueError("metric_for_best must name an eval metric, e.g. 'loss' or 'accuracy'")
        if self.load_best_at_end and self.output_dir is None:
            raise ValueError("load_best_at_end needs output_dir (the best adapter is saved there)")

    def _check_rest(self) -> None:
        check_positive_int("log_every", self.log_every)
        check_positive_int("adv_steps", self.adv_steps)
        check_finite_number("adv_epsilon", self.adv_epsilon, positive=True)
        check_finite_number("adv_alpha", self.adv_alpha, positive=True)
        if self.save_total_limit is not None:
            check_positive_int("save_total_limit", self.save_total_limit)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int):
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.output_dir is not None and not isinstance(self.output_dir, str | os.PathLike):
            raise ValueError(f"output_dir must be a path (a str), got {self.output_dir!r}")
        self._check_distributed()
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )

    def _check_distributed(self) -> None:
        blocks = self.shard_modules
        if not isinstance(blocks, tuple) or not all(isinstance(n, str) and n for n in blocks):
            raise ValueError(
                "shard_modules must be a tuple of module class names such as ('LlamaDecoderLayer',),"
                f" got {blocks!r}"
            )
        if blocks and self.distributed != "fsdp2":
            raise ValueError(
                "shard_modules names the blocks to shard; it needs distributed='fsdp2'"
            )
        if self.distributed == "fsdp2" and self.precision == "fp16":
            raise ValueError(
                "distributed='fsdp2' with precision='fp16' is not supported (its gradient scaler is "
                "not sharding-aware here); use precision='bf16'"
            )

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger ``metric_for_best`` is an improvement."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.metric_for_best.endswith("loss")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["betas"] = list(self.betas)
        out["shard_modules"] = list(self.shard_modules)
        if self.output_dir is not None:
            out["output_dir"] = os.fspath(self.output_dir)
        return out


def _unknown_field(key: str, value: Any, names: list[str]) -> str:
    head = f"TrainConfig has no field {key!r}"
    if key in _HF_NAMES:
        field = _HF_NAMES[key]
        if field == "precision":
            return f"{head}; peftkit calls it precision= (did you mean precision={key!r}?)"
        return f"{head}; peftkit calls it {field}= (did you mean {field}={value!r}?)"
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if close:
        return f"{head}; did you mean {' or '.join(f'{c}=' for c in close)}?"
    return f"{head}; its fields are: {', '.join(names)}"
