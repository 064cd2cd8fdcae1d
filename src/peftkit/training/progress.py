"""Where a run stands (saved with every checkpoint), what ``fit`` returns, and the best-so-far rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before the update."""


@dataclass
class Progress:
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch consumed by this process
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    skipped: int = 0  # steps skipped for a non-finite loss

    def record_eval(self, value: float, config: TrainConfig) -> bool:
        """Note an evaluation of ``metric_for_best``; True when it is the new best."""
        sign = 1.0 if config.higher_is_better else -1.0
        if self.best_metric is None or sign * (value - self.best_metric) > config.min_delta:
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
            return True
        self.bad_evals += 1
        return False

    def should_stop(self, config: TrainConfig) -> bool:
        """Early stopping: ``patience`` evaluations in a row without an improvement."""
        return config.patience is not None and self.bad_evals >= config.patience


@dataclass
class TrainResult:
    step: int
    epoch: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
