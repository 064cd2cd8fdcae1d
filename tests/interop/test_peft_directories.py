"""Directories of one library handed to the other: what peft does with a peftkit checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

import peftkit
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftkit.interop import export_peft

from zoo import CASES

LLAMA = CASES["llama"]


def train(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        LLAMA.loss(model).backward()
        opt.step()
    model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return LLAMA.output(model)


def assert_same_and_trained(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the order of the products (as in test_peft_lora_interop), and trained."""
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - logits(LLAMA.build())).abs().max() > 1e-3, "training changed nothing"


def _peftkit_llama() -> torch.nn.Module:
    model = LLAMA.build()
    peftkit.apply_lora(model, r=4, targets=["q_proj", "v_proj"])
    train(model)
    return model


# -- peftkit's directory, read by peft ----------------------------------------------------------
def test_peft_does_not_take_a_peftkit_checkpoint_for_its_own(tmp_path: Path) -> None:
    peftkit.save_adapter(_peftkit_llama(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    # Formerly a bare KeyError: 'peft_type' from peft reading peftkit's adapter_config.json.
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(LLAMA.build(), str(tmp_path))


def test_export_peft_beside_save_adapter_serves_both_libraries(tmp_path: Path) -> None:
    model = _peftkit_llama()
    peftkit.save_adapter(model, tmp_path)
    export_peft(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", CONFIG_NAME, WEIGHTS_NAME]
    in_peft = PeftModel.from_pretrained(LLAMA.build(), str(tmp_path))
    assert_same_and_trained(logits(in_peft), logits(model))
    reloaded = peftkit.load_adapter(LLAMA.build(), tmp_path)  # peftkit's own files win
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    peftkit.save_adapter(reloaded, tmp_path)  # a new save leaves peft's files alone
    assert sorted(p.name for p in tmp_path.iterdir()) == names
