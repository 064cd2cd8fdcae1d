"""LoRA on nn.Conv1d and nn.MultiheadAttention shared with the real peft, both directions.

peft (0.21.2) adds an attention module's out-projection update twice, in forward and in merge;
``_compat.peft_attention_out_count`` finds how many times, and the converter scales those factors
so that both libraries compute the same outputs from one file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import _compat
from peftkit.interop import InteropError, export_peft, import_peft
from peftkit.methods.lora_torch import LoraConv1d, LoraMultiheadAttention

from interop_helpers import assert_same_and_trained, logits, train
from zoo import Case

E = 8


class SeqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, E, 3, stride=2, padding=1)
        self.mha = nn.MultiheadAttention(E, 2, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        mask = torch.zeros(h.shape[:2], dtype=torch.bool)
        mask[0, -1] = True  # one padded key
        out, _ = self.mha(h, h, h, key_padding_mask=mask)
        return self.head(out.mean(dim=1))


SEQ = Case(
    "seq", SeqNet, lambda: {"x": torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0))}
)


@pytest.mark.parametrize("targets", [["conv"], ["mha"], ["conv", "mha", "head"]])
def test_trained_in_peftkit_loads_in_peft_with_the_same_logits(
    targets: list[str], tmp_path: Path
) -> None:
    model = SEQ.build()
    peftkit.apply_lora(model, r=2, alpha=4, targets=targets, rslora=True)
    train(model, SEQ.loss)
    export_peft(model, tmp_path)
    loaded = PeftModel.from_pretrained(SEQ.build(), tmp_path).eval()
    assert_same_and_trained(SEQ, logits(SEQ, loaded), logits(SEQ, model))


@pytest.mark.parametrize("targets", [["conv"], ["mha"], ["conv", "mha"]])
def test_trained_in_peft_imports_into_peftkit_with_the_same_logits(
    targets: list[str], tmp_path: Path
) -> None:
    config = PeftLoraConfig(r=3, lora_alpha=5, target_modules=targets, rank_pattern={"conv": 2})
    trained = get_peft_model(SEQ.build(), config)
    train(trained, SEQ.loss)
    trained.save_pretrained(tmp_path)
    model = import_peft(SEQ.build(), tmp_path)
    assert_same_and_trained(SEQ, logits(SEQ, model), logits(SEQ, trained))
    kinds = {"conv": LoraConv1d, "mha": LoraMultiheadAttention}
    assert all(isinstance(getattr(model, t), kinds[t]) for t in targets)
    expected = logits(SEQ, model)
    peftkit.merge_and_unload(model)
    torch.testing.assert_close(logits(SEQ, model), expected, atol=1e-5, rtol=1e-5)


def test_export_keys_and_the_round_trip_are_exact(tmp_path: Path) -> None:
    model = SEQ.build()
    peftkit.apply_lora(model, r=2, targets=["conv", "mha"])
    train(model, SEQ.loss)
    export_peft(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.{name}.{factor}.weight"
        for name in ("conv", "mha", "mha.base_layer.out_proj")
        for factor in ("lora_A", "lora_B")
    }
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "conv",
        "mha",
    ]
    again = import_peft(SEQ.build(), tmp_path)
    torch.testing.assert_close(logits(SEQ, again), logits(SEQ, model), rtol=0, atol=0)


def test_peft_adds_the_out_projection_update_as_many_times_as_the_probe_says() -> None:
    # The converter's scale rests on this count; compare it with peft on a real module.
    count = _compat.peft_attention_out_count()
    wrapped = get_peft_model(SEQ.build(), PeftLoraConfig(r=2, target_modules=["mha"])).eval()
    attention = wrapped.base_model.model.mha
    out_proj = attention.base_layer.out_proj
    plain = SEQ.build().mha
    h = torch.randn(2, 5, E)
    with torch.no_grad():
        out_proj.lora_B["default"].weight.normal_()
        plain.out_proj.weight += count * out_proj.get_delta_weight("default")
        torch.testing.assert_close(attention(h, h, h)[0], plain(h, h, h)[0], atol=1e-5, rtol=0)


def test_dilated_conv1d_is_refused_for_peft(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv1d(4, 6, 3, dilation=2))
    peftkit.apply_lora(model, r=2, targets=["0"])
    with pytest.raises(InteropError, match=r"0: Conv1d with dilation=\(2,\); peft's LoRA conv"):
        export_peft(model, tmp_path)


def test_attention_factors_without_the_out_projection_are_refused(tmp_path: Path) -> None:
    get_peft_model(SEQ.build(), PeftLoraConfig(r=2, target_modules=["mha"])).save_pretrained(
        tmp_path
    )
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if "out_proj" not in k}
    save_file(tensors, path)
    model = SEQ.build()
    with pytest.raises(InteropError, match=r"mha is a MultiheadAttention but the adapter lacks"):
        import_peft(model, tmp_path)
    assert not peftkit.adapters(model)
