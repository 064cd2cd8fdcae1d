"""DoRA adapters (``use_dora=True``) shared with the real HF ``peft`` package, both directions.

Linear (tiny Llama and BERT), transformers' Conv1D (tiny GPT-2) and Conv2d (a small conv net): an
adapter trained for a few steps in one library gives the other's logits within float32 rounding, and
one backward gives the same gradients (both treat the norm as a constant).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.interop import export_peft, import_peft
from peftkit.methods.dora import DoraConv2d, DoraLinear

from interop_helpers import TOL, assert_import_refused, assert_same_and_trained, logits, train
from zoo import CASES, Case


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


CONV = Case(
    "conv",
    ConvNet,
    lambda: {"x": torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))},
)

# name -> (case, peftkit fields, peft LoraConfig fields)
SETUPS: dict[str, tuple[Case, dict[str, Any], dict[str, Any]]] = {
    "llama": (
        CASES["llama"],
        {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ),
    "bert": (
        CASES["bert"],
        {"r": 2, "alpha": 4, "targets": ["query", "dense"], "dropout": 0.1},
        {"r": 2, "lora_alpha": 4, "target_modules": ["query", "dense"], "lora_dropout": 0.1},
    ),
    "gpt2": (
        CASES["gpt2"],
        {"r": 4, "alpha": 8, "targets": ["c_attn", "c_fc"], "rslora": True},
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_fc"],
            "use_rslora": True,
            "fan_in_fan_out": True,
        },
    ),
    "conv": (
        CONV,
        {"r": 2, "alpha": 4, "targets": ["conv", "head"]},
        {"r": 2, "lora_alpha": 4, "target_modules": ["conv", "head"]},
    ),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_trained_in_peftkit_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    case, fields, _ = SETUPS[name]
    model = case.build()
    peftkit.apply_lora(model, dora=True, **fields)
    train(model, case.loss)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert_same_and_trained(case, logits(case, loaded), logits(case, model))


@pytest.mark.parametrize("name", list(SETUPS))
def test_trained_in_peft_imports_into_peftkit_and_exports_back(name: str, tmp_path: Path) -> None:
    case, _, peft_fields = SETUPS[name]
    trained = get_peft_model(case.build(), PeftLoraConfig(use_dora=True, **peft_fields))
    train(trained, case.loss)
    trained.save_pretrained(tmp_path / "peft")
    model = import_peft(case.build(), tmp_path / "peft")
    assert peftkit.adapters(model)["default"].config.dora
    assert any(isinstance(m, DoraLinear | DoraConv2d) for m in model.modules())
    assert_same_and_trained(case, logits(case, model), logits(case, trained))

    export_peft(model, tmp_path / "back")  # the same tensors, under the same names and shapes
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    again = PeftModel.from_pretrained(case.build(), tmp_path / "back").eval()
    torch.testing.assert_close(logits(case, again), logits(case, trained), rtol=0, atol=0)


def _grads(model: torch.nn.Module, case: Case) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in the base model (GPT-2's) for both libraries
    case.loss(model).backward()
    return {
        _our_name(name): p.grad.reshape(-1).clone()
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _our_name(peft_name: str) -> str:
    """peft's parameter name (or peftkit's, unchanged) as peftkit's."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace("lora_magnitude_vector.weight", "lora_magnitude")
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1", name)


@pytest.mark.parametrize("name", ["llama", "gpt2", "conv"])
def test_one_backward_gives_peft_s_gradients(name: str, tmp_path: Path) -> None:
    case, _, peft_fields = SETUPS[name]
    theirs = get_peft_model(case.build(), PeftLoraConfig(use_dora=True, **peft_fields))
    train(theirs, case.loss, steps=2)  # B away from zero, m away from ||W||
    theirs.save_pretrained(tmp_path)
    ours = import_peft(case.build(), tmp_path)
    want = _grads(theirs, case)
    got = _grads(ours, case)
    assert got.keys() == want.keys() and any("lora_magnitude" in k for k in got)
    for key, grad in want.items():
        torch.testing.assert_close(got[key], grad, **TOL, msg=key)


def test_a_lora_file_without_magnitudes_is_refused_as_dora(tmp_path: Path) -> None:
    case, _, peft_fields = SETUPS["llama"]
    get_peft_model(case.build(), PeftLoraConfig(**peft_fields)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert_import_refused(
        tmp_path,
        r"model\.layers\.0\.mlp\.down_proj: the adapter has no lora_magnitude_vector but the "
        r"config says use_dora=True",
    )


def test_peft_dora_on_an_embedding_is_refused(tmp_path: Path) -> None:
    case = CASES["llama"]
    fields = {"r": 2, "target_modules": ["embed_tokens"], "use_dora": True}
    get_peft_model(case.build(), PeftLoraConfig(**fields)).save_pretrained(tmp_path)
    assert_import_refused(tmp_path, r"model\.embed_tokens: DoRA on an embedding")
