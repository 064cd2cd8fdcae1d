"""Helpers the peft interop tests share: editing a saved peft config, and checking a refused import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit.interop import InteropError, import_peft

from helpers import snapshot
from zoo import CASES


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
