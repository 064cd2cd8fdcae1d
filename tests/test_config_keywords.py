"""A keyword a config does not have is refused with the field to use instead: HF peft's names from the
one table in ``peftkit._keywords`` (for every config class), the closest fields for a typo. Loading a
saved config keeps ignoring unknown keys with a warning."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    FullConfig,
    LoraConfig,
    MethodConfig,
    PrefixConfig,
    TargetedConfig,
    apply_lora,
)
from peftkit._keywords import PEFT_NAMES, init_fields
from peftkit.registry import methods, spec

from helpers import snapshot
from zoo import TinyTransformer

DOCS = Path(__file__).resolve().parents[1] / "docs"
RANKS = "LoRA's rank is r=; AdaLoRA's are init_r= (at the start) and target_r= (average at the end)"

MESSAGES: list[tuple[type[MethodConfig], dict[str, Any], str]] = [
    (
        LoraConfig,
        {"lora_alpha": 16},
        "LoraConfig has no field 'lora_alpha'; peftkit calls it alpha= (did you mean alpha=16?)",
    ),
    (
        LoraConfig,
        {"target_modules": "q_proj|v_proj"},
        "LoraConfig has no field 'target_modules'; peftkit calls it targets= "
        "(did you mean targets=['re:q_proj|v_proj']?)",
    ),
    (
        LoraConfig,
        {"lora_dropout": 0.1},
        "LoraConfig has no field 'lora_dropout'; peftkit calls it dropout= (did you mean dropout=0.1?)",
    ),
    (
        LoraConfig,
        {"use_rslora": True},
        "LoraConfig has no field 'use_rslora'; peftkit calls it rslora= (did you mean rslora=True?)",
    ),
    (
        LoraConfig,
        {"layers_to_transform": 3},
        "LoraConfig has no field 'layers_to_transform'; peftkit calls it layers= "
        "(did you mean layers=[3]?)",
    ),
    (
        LoraConfig,
        {"init_lora_weights": True},
        "LoraConfig has no field 'init_lora_weights'; peftkit calls it init= (did you mean "
        "init='kaiming'?); peftkit's init is 'kaiming' or 'gaussian'; B starts at zero with either, "
        "so the adapted model starts out equal to the base",
    ),
    (
        LoraConfig,
        {"fan_in_fan_out": True},
        "LoraConfig has no field 'fan_in_fan_out'; not needed: peftkit recognises transformers' "
        "Conv1D (GPT-2) by its type and handles its (in, out) weight itself; drop the keyword",
    ),
    (
        AdaLoraConfig,
        {"r": 4, "total_steps": 10},
        f"AdaLoraConfig has no field 'r'; peftkit calls it init_r= (did you mean init_r=4?); {RANKS}",
    ),
    (
        AdaLoraConfig,
        {"exclude_modules": ["lm_head"], "total_steps": 10},
        "AdaLoraConfig has no field 'exclude_modules'; peftkit calls it exclude= "
        "(did you mean exclude=['lm_head']?)",
    ),
    (
        AdaLoraConfig,
        {"deltaT": 5, "total_steps": 10},
        "AdaLoraConfig has no field 'deltaT'; peftkit calls it delta_t= (did you mean delta_t=5?)",
    ),
    (
        PrefixConfig,
        {"num_virtual_tokens": 20},
        "PrefixConfig has no field 'num_virtual_tokens'; peftkit calls it prefix_length= "
        "(did you mean prefix_length=20?)",
    ),
    (
        PrefixConfig,
        {"encoder_hidden_size": 64},
        "PrefixConfig has no field 'encoder_hidden_size'; peftkit calls it mlp_hidden= (did you "
        "mean mlp_hidden=64?); the prefix trains through an MLP exactly when mlp_hidden is set",
    ),
    (
        PrefixConfig,
        {"lora_alpha": 16},
        "PrefixConfig has no field 'lora_alpha'; peftkit calls it alpha= (AdaLoraConfig, "
        "LoraConfig), which PrefixConfig does not have; its fields are: modules_to_save, "
        "train_head, prefix_length, mlp_hidden, init_std, init_token_ids, positions_after_prefix",
    ),
    (
        AdapterConfig,
        {"lora_dropout": 0.1},
        "AdapterConfig has no field 'lora_dropout'; peftkit calls it dropout= "
        "(did you mean dropout=0.1?)",
    ),
    (
        FullConfig,
        {"bias": "all"},
        "FullConfig has no field 'bias'; peftkit calls it biases_only= (did you mean "
        "biases_only=True?); peftkit keeps base biases frozen; to train them too (peft's "
        "bias='all'), add a second adapter that trains them in place: "
        "peftkit.apply_full(model, biases_only=True, adapter_name='bias')",
    ),
    (
        LoraConfig,
        {"task_type": "SEQ_CLS"},
        "LoraConfig has no field 'task_type'; peftkit has no task types: it adapts the model you "
        "pass. The task head of an HF *For* model (classifier, score, qa_outputs) trains in full by "
        "default (train_head=False keeps it frozen); TrainConfig(task=...) picks the loss",
    ),
    (
        LoraConfig,
        {"targts": ["q_proj"]},
        "LoraConfig has no field 'targts'; did you mean targets=['q_proj']?",
    ),
    (
        LoraConfig,
        {"rank_patern": {"q_proj": 4}},
        "LoraConfig has no field 'rank_patern'; closest fields: rank_pattern=, alpha_pattern=, "
        "layers_pattern=",
    ),
    (
        PrefixConfig,
        {"zzz": 1},
        "PrefixConfig has no field 'zzz'; its fields are: modules_to_save, train_head, "
        "prefix_length, mlp_hidden, init_std, init_token_ids, positions_after_prefix",
    ),
]


@pytest.mark.parametrize(
    ("config_cls", "fields", "message"),
    MESSAGES,
    ids=[f"{c.__name__}-{next(iter(f))}" for c, f, _ in MESSAGES],
)
def test_a_keyword_the_config_lacks_names_the_field_to_use(
    config_cls: type[MethodConfig], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError) as caught:
        config_cls(**fields)
    assert str(caught.value) == message


def test_apply_lora_with_a_peft_keyword_names_the_field_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    before = snapshot(model)
    with pytest.raises(TypeError) as caught:
        apply_lora(model, r=8, lora_alpha=16, target_modules=["q_proj"])
    assert str(caught.value) == (
        "LoraConfig has no field 'lora_alpha'; peftkit calls it alpha= (did you mean alpha=16?)\n"
        "LoraConfig has no field 'target_modules'; peftkit calls it targets= "
        "(did you mean targets=['q_proj']?)"
    )
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_a_third_party_config_gets_the_same_messages() -> None:
    @dataclass(frozen=True, kw_only=True)
    class ScaleConfig(TargetedConfig):
        alpha: float = 1.0

    with pytest.raises(TypeError) as caught:
        ScaleConfig(lora_alpha=2.0)
    assert str(caught.value) == (
        "ScaleConfig has no field 'lora_alpha'; peftkit calls it alpha= (did you mean alpha=2.0?)"
    )


def test_loading_a_saved_config_still_ignores_unknown_keys_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"LoraConfig: ignoring unknown keys \['lora_alpha'\]"):
        config = LoraConfig.from_dict({"r": 4, "lora_alpha": 32, "targets": ["q_proj"]})
    assert config.r == 4 and config.alpha == 16.0 and config.targets == ("q_proj",)


def test_valid_configs_build_copy_and_replace_as_before() -> None:
    config = LoraConfig(r=4, alpha=8.0, targets=["q_proj"])
    assert copy.deepcopy(config) == config
    assert dataclasses.replace(config, r=2).r == 2
    with pytest.raises(TypeError, match="peftkit calls it alpha="):
        dataclasses.replace(config, lora_alpha=2)
    with pytest.raises(TypeError, match="positional"):
        LoraConfig(4)  # type: ignore[misc]


CLASSES = [spec(name).config_cls for name in methods()]


@pytest.mark.parametrize("key", sorted(PEFT_NAMES))
def test_every_table_entry_suggests_a_field_the_config_has(key: str) -> None:
    entry = PEFT_NAMES[key]
    assert not entry.fields or any(f in init_fields(c) for c in CLASSES for f in entry.fields), (
        f"{key}: no registered config has {entry.fields}"
    )
    for config_cls in CLASSES:
        if key in init_fields(config_cls):
            continue  # peft and peftkit share this name for this method
        with pytest.raises(TypeError) as caught:
            config_cls(**{key: 4})
        message = str(caught.value)
        assert message.startswith(f"{config_cls.__name__} has no field {key!r}; ")
        named = re.search(r"peftkit calls it (\w+)= \(did you mean", message)
        if named:
            assert named.group(1) in init_fields(config_cls)


def test_the_table_lists_peft_s_own_names() -> None:
    peft = pytest.importorskip("peft")
    names = {
        f.name
        for cls in (peft.LoraConfig, peft.AdaLoraConfig, peft.PrefixTuningConfig)
        for f in dataclasses.fields(cls)
    }
    assert set(PEFT_NAMES) - names == {"rank"}  # the one alias that is not a peft field


def test_the_coming_from_peft_page_covers_every_table_entry() -> None:
    page = (DOCS / "coming-from-peft.md").read_text()
    missing = [key for key in PEFT_NAMES if f"`{key}" not in page]
    assert not missing, f"docs/coming-from-peft.md does not mention {missing}"


def test_the_defaults_the_coming_from_peft_page_compares_are_the_code_s() -> None:
    lora, ada, prefix = LoraConfig(), AdaLoraConfig(total_steps=10), PrefixConfig()
    assert (lora.targets, lora.alpha, lora.r, lora.dropout, lora.init) == (
        "all-linear",
        16.0,
        8,
        0.0,
        "kaiming",
    )
    assert (ada.t_init, ada.t_final, ada.delta_t) == (None, None, None)
    ada = AdaLoraConfig(total_steps=200)  # None: 1/8, 1/4 and 1/20 of the run
    assert (ada.warmup_steps, ada.final_steps, ada.mask_every) == (25, 50, 10)
    assert (ada.alpha, ada.orth_reg_weight, ada.init_r, ada.target_r) == (
        16.0,
        0.1,
        12,
        8,
    )
    assert (prefix.prefix_length, prefix.positions_after_prefix) == (16, False)
    peft = pytest.importorskip("peft")
    theirs = {f.name: f.default for f in dataclasses.fields(peft.LoraConfig)}
    assert (theirs["target_modules"], theirs["lora_alpha"], theirs["r"]) == (None, 8, 8)
    assert (theirs["lora_dropout"], theirs["init_lora_weights"]) == (0.0, True)
    ada_theirs = {f.name: f.default for f in dataclasses.fields(peft.AdaLoraConfig)}
    assert (ada_theirs["deltaT"], ada_theirs["orth_reg_weight"]) == (1, 0.5)
    assert {f.name: f.default for f in dataclasses.fields(peft.PrefixTuningConfig)}[
        "num_virtual_tokens"
    ] is None
