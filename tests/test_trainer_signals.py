"""The Trainer's SIGINT handler: installed only during fit, only over Python's default handler, and
restored afterwards (the Ctrl-C behaviour itself is in tests/reliability/test_trainer_interrupt.py)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import pytest
import torch
from torch import nn

from peftkit import TrainConfig, Trainer
from peftkit.training.tasks import TaskLoss

from trainer_data import lm_data, lora_transformer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
LM = TaskLoss("causal_lm")


def _config(**kw: object) -> TrainConfig:
    fields: dict[str, object] = {"max_steps": 2, "batch_size": 4, "eval_every": None}
    return TrainConfig(**{**fields, "progress": False, **kw})  # type: ignore[arg-type]


def test_handler_is_installed_during_fit_and_restored_after() -> None:
    seen = []

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        seen.append(signal.getsignal(signal.SIGINT))
        return LM(model, batch)

    Trainer(lora_transformer(), _config(), loss_fn=loss_fn).fit(lm_data(8))
    assert seen and all(h is not signal.default_int_handler for h in seen)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_programs_own_handler_is_kept() -> None:
    def own(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGINT, own)
    try:
        seen = []

        def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            seen.append(signal.getsignal(signal.SIGINT))
            return LM(model, batch)

        Trainer(lora_transformer(), _config(), loss_fn=loss_fn).fit(lm_data(8))
        assert seen and all(h is own for h in seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupt_without_output_dir_raises_after_the_step(tmp_path: Path) -> None:
    """Ctrl-C in a run without output_dir: the step ends, nothing is written, KeyboardInterrupt."""
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGINT)  # delivered to the handler during step 1
        return LM(model, batch)

    trainer = Trainer(lora_transformer(), _config(max_steps=5), loss_fn=loss_fn)
    with pytest.raises(KeyboardInterrupt, match=r"^training interrupted after step 1$"):
        trainer.fit(lm_data(20))
    assert trainer.progress.step == 1 and calls["n"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
