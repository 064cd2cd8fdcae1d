"""LoRA adapters shared with the real HF ``peft`` package, both directions.

Each test trains an adapter for a few optimiser steps in one library on a tiny model built from a
config, converts it through the files, loads it in the other library on a fresh copy of the same
base, and compares logits in float32 with ``atol=1e-5, rtol=1e-5``: both compute the same products,
in a different order (peftkit adds ``s·(x Aᵀ) Bᵀ`` in one fused addmm, peft adds it after a separate
matmul). Every test also checks that training moved the output away from the base's, so the
comparison is not trivially between two base models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.interop import export_peft, import_peft
from peftkit.methods.lora import LoraEmbedding, LoraLinear

from interop_helpers import TOL, assert_same_and_trained, logits, train
from zoo import CASES, Case

# -- peftkit -> peft ---------------------------------------------------------------------------
EXPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # GPT-2: Conv1D layers and the (tied) token embedding; rsLoRA; per-module rank and alpha.
    "gpt2": (
        {
            "r": 4,
            "alpha": 8,
            "rslora": True,
            "dropout": 0.1,
            "targets": ["c_attn", "c_proj", "wte"],
            "rank_pattern": {"c_proj": 2},
            "alpha_pattern": {"c_attn": 4},
        },
        {"task_type": "CAUSAL_LM"},
    ),
    # BERT: a fresh classifier trained in full (modules_to_save).
    "bert": (
        {"r": 4, "targets": ["query", "value"], "modules_to_save": ["classifier"]},
        {"task_type": "SEQ_CLS"},
    ),
    # Llama: every linear layer plus the embedding; a regex rank override on one block.
    "llama": (
        {
            "r": 4,
            "targets": ["re:.*_proj", "embed_tokens"],
            "rank_pattern": {"re:model\\.layers\\.1\\..*": 2},
        },
        {},
    ),
    # T5: only block 1 (so names must be exported as full paths), encoder and decoder.
    "t5": ({"r": 2, "alpha": 6, "targets": ["q", "v", "wo"], "layers": [1]}, {}),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_trained_in_peftkit_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    fields, export_args = EXPORTS[name]
    model = case.build()
    peftkit.apply_lora(model, **fields)
    train(model, case.loss)
    export_peft(model, tmp_path, **export_args)
    loaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert_same_and_trained(case, logits(case, loaded), logits(case, model))


def test_export_writes_short_exact_names(tmp_path: Path) -> None:
    case = CASES["t5"]
    model = case.build()
    peftkit.apply_lora(model, r=2, targets=["q", "v", "wo"], layers=[1], rank_pattern={"wo": 3})
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    # Leaf names would also select block 0, so every target is a full path.
    assert "encoder.block.1.layer.0.SelfAttention.q" in config["target_modules"]
    assert not any(".block.0." in t for t in config["target_modules"])
    assert config["rank_pattern"] == {"wo": 3}  # every adapted `wo` has rank 3: the leaf suffices

    gpt2 = CASES["gpt2"].build()
    peftkit.apply_lora(gpt2, r=4, targets=["c_attn", "c_fc"], alpha_pattern={"c_fc": 2})
    export_peft(gpt2, tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_fc"]
    assert config["alpha_pattern"] == {"c_fc": 2} and config["fan_in_fan_out"] is True


# -- peft -> peftkit ---------------------------------------------------------------------------
IMPORTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "gpt2",
        {
            "target_modules": ["c_attn", "wte"],
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "rank_pattern": {"c_attn": 6},
            "fan_in_fan_out": True,
        },
    ),
    # SEQ_CLS makes peft add classifier/score to modules_to_save by itself.
    "bert": ("bert", {"target_modules": ["query", "key"], "r": 4, "task_type": "SEQ_CLS"}),
    "llama": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            "r": 4,
            "lora_alpha": 16,
            "layers_to_transform": [0],
            "rank_pattern": {"mlp\\.(up|down)_proj": 2},
            "alpha_pattern": {"o_proj": 3},
            "lora_dropout": 0.1,
        },
    ),
    "llama-all-linear": ("llama", {"target_modules": "all-linear", "r": 2}),
    "t5": (
        "t5",
        {
            "target_modules": r".*decoder.*\.(q|v)",
            "r": 2,
            "init_lora_weights": "gaussian",
            "modules_to_save": ["lm_head"],
        },
    ),
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_trained_in_peft_imports_into_peftkit_with_the_same_logits(
    name: str, tmp_path: Path
) -> None:
    case_name, fields = IMPORTS[name]
    case = CASES[case_name]
    trained = get_peft_model(case.build(), PeftLoraConfig(**fields))
    train(trained, case.loss)
    trained.save_pretrained(tmp_path)
    model = import_peft(case.build(), tmp_path)
    assert_same_and_trained(case, logits(case, model), logits(case, trained))
    # The imported adapter is a normal peftkit adapter: it trains, saves and merges.
    assert peftkit.trainable_parameters(model)
    expected = logits(case, model)
    peftkit.merge_and_unload(model)
    torch.testing.assert_close(logits(case, model), expected, **TOL)


def test_import_reads_ranks_alphas_and_layer_types(tmp_path: Path) -> None:
    case = CASES["gpt2"]
    get_peft_model(case.build(), PeftLoraConfig(**IMPORTS["gpt2"][1])).save_pretrained(tmp_path)
    model = import_peft(case.build(), tmp_path, adapter_name="from_peft")
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoraLinear) and attn.adapter_name == "from_peft"
    assert attn.r == 6 and attn.scaling == pytest.approx(8 / 6**0.5)
    wte = model.transformer.wte
    assert isinstance(wte, LoraEmbedding) and wte.r == 4 and wte.scaling == pytest.approx(8 / 2)
    config = peftkit.adapters(model)["from_peft"].config
    assert list(config.targets) == ["c_attn", "wte"] and config.rank_pattern == {"c_attn": 6}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


CONV = Case("conv", ConvNet, lambda: {"x": torch.randn(2, 3, 9, 9, generator=_gen())})


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_conv2d_both_directions(tmp_path: Path) -> None:
    model = CONV.build()
    peftkit.apply_lora(model, r=2, targets=["conv", "head"])
    train(model, CONV.loss)
    export_peft(model, tmp_path / "out")
    loaded = PeftModel.from_pretrained(CONV.build(), tmp_path / "out").eval()
    assert_same_and_trained(CONV, logits(CONV, loaded), logits(CONV, model))

    trained = get_peft_model(CONV.build(), PeftLoraConfig(r=3, target_modules=["conv"]))
    train(trained, CONV.loss)
    trained.save_pretrained(tmp_path / "in")
    model = import_peft(CONV.build(), tmp_path / "in")
    assert_same_and_trained(CONV, logits(CONV, model), logits(CONV, trained))


def test_round_trip_through_the_peft_format_is_exact(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    peftkit.apply_lora(
        model,
        r=4,
        targets=["query", "value", "word_embeddings"],
        rslora=True,
        alpha_pattern={"re:.*layer\\.1\\..*value": 3.0},
        modules_to_save=["classifier"],
    )
    train(model, case.loss)
    export_peft(model, tmp_path)
    again = import_peft(case.build(), tmp_path)
    torch.testing.assert_close(logits(case, again), logits(case, model), rtol=0, atol=0)
    before = peftkit.adapter_state_dict(model)
    after = peftkit.adapter_state_dict(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
