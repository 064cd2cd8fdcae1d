"""Helpers the peft interop tests share: editing a saved peft config, and checking a refused import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.interop import InteropError, import_peft

from helpers import snapshot
from zoo import CASES, Case


def edit_config(path: Path, **changes: Any) -> None:
    """Change fields of the adapter_config.json in ``path``."""
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def assert_import_refused(path: Path, match: str, case: str = "llama") -> None:
    """import_peft raises an InteropError matching ``match`` and leaves a fresh model untouched."""
    model = CASES[case].build()
    before = snapshot(model)
    with pytest.raises(InteropError, match=match):
        import_peft(model, path)
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert all(p.requires_grad for p in model.parameters())


# Outputs of peftkit and peft on one adapter agree to float32 rounding.
TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


def train(model: nn.Module, loss: Any, steps: int = 3) -> None:
    """A few AdamW steps on the trainable parameters (adapter tensors and saved modules)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    model.eval()


def logits(case: Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model)


def assert_same_and_trained(case: Case, got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` matches ``expected``, which training moved away from the base model's output."""
    torch.testing.assert_close(got, expected, **TOL)
    base = logits(case, case.build())
    assert (expected - base).abs().max() > 1e-3, "training did not change the output"
