"""Directories of one library handed to the other: what peft does with a peftkit checkpoint, and
``peftkit.load_adapter`` on a directory peft saved (imported through ``interop.import_peft``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import peftkit
from peftkit import CheckpointError
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


def _peft_llama(path: Path) -> PeftModel:
    trained = get_peft_model(
        LLAMA.build(), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    train(trained)
    trained.save_pretrained(path)
    return trained


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


# -- peft's directory, read by peftkit.load_adapter ---------------------------------------------
def test_load_adapter_imports_a_directory_peft_saved(tmp_path: Path) -> None:
    trained = _peft_llama(tmp_path)
    model = peftkit.load_adapter(LLAMA.build(), tmp_path)
    assert list(peftkit.adapters(model)) == ["default"]
    assert_same_and_trained(logits(model), logits(trained))
    named = peftkit.load_adapter(LLAMA.build(), tmp_path, ["from_peft"])
    assert list(peftkit.adapters(named)) == ["from_peft"]
    torch.testing.assert_close(logits(named), logits(model), rtol=0, atol=0)


def test_load_adapter_on_a_peft_directory_keeps_the_importers_refusals(tmp_path: Path) -> None:
    _peft_llama(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds one adapter; pass one name.*\['a', 'b'\]"):
        peftkit.load_adapter(LLAMA.build(), tmp_path, ["a", "b"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    model = LLAMA.build()
    with pytest.raises(CheckpointError, match="no lora_magnitude_vector but the config says use_d"):
        peftkit.load_adapter(model, tmp_path)
    assert not peftkit.adapters(model)


def test_load_adapter_refuses_a_pickled_peft_adapter_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickle.*never unpickles.*safe_serialization=True"):
        peftkit.load_adapter(LLAMA.build(), tmp_path)


def test_load_adapter_lists_the_adapters_of_a_multi_adapter_peft_directory(
    tmp_path: Path,
) -> None:
    for name in ("first", "second"):
        _peft_llama(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"pass one of \['first', 'second'\]"):
        peftkit.load_adapter(LLAMA.build(), tmp_path)
