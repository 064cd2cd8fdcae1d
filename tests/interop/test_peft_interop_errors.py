"""What peftkit cannot represent in peft's format (or read from it) is an error that names it.

Each case checks the message and that a failed import leaves the model exactly as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoHaConfig, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from torch import nn

import peftkit
from peftkit import AdapterLayer, CheckpointError, SwapMethod, TargetedConfig
from peftkit.interop import InteropError, converters, export_peft, import_peft

from helpers import temporarily_registered
from interop_helpers import assert_import_refused, edit_config
from zoo import CASES


def _peft_lora(tmp_path: Path, case: str = "llama", **fields: Any) -> Path:
    fields = {"r": 4, "target_modules": ["q_proj", "v_proj"], **fields}
    get_peft_model(CASES[case].build(), PeftLoraConfig(**fields)).save_pretrained(tmp_path)
    return tmp_path


# -- import ------------------------------------------------------------------------------------
def test_dora_magnitudes_without_use_dora_are_refused(tmp_path: Path) -> None:
    path = _peft_lora(tmp_path, use_dora=True)
    edit_config(path, use_dora=False)
    assert_import_refused(
        path,
        r"model\.layers\.0\.self_attn\.q_proj: the adapter has a lora_magnitude_vector but the "
        r"config says use_dora=False",
    )


def test_trained_base_bias_is_refused(tmp_path: Path) -> None:
    assert_import_refused(
        _peft_lora(tmp_path, case="bert", target_modules=["query"], bias="all"),
        "bias='all'",
        "bert",
    )


def test_lora_bias_is_refused(tmp_path: Path) -> None:
    assert_import_refused(_peft_lora(tmp_path, lora_bias=True), "lora_bias=True")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"layer_replication": [[0, 2]]}, "layer replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable token"),
        ({"target_parameters": ["mlp.experts"]}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*path_initial_model"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"some_future_option": {"on": True}}, r"\['some_future_option'\].*will not guess"),
        ({"rank_pattern": {"q_proj": 8}}, "rank 4 but the config says 8"),
        ({"rank_pattern": {"(": 8}}, "not a valid regular expression"),
        ({"lora_alpha": -2}, "alpha must be a positive"),
    ],
)
def test_features_peftkit_cannot_represent_are_named(
    tmp_path: Path, changes: dict[str, Any], match: str
) -> None:
    path = _peft_lora(tmp_path)
    edit_config(path, **changes)
    assert_import_refused(path, match)


def test_unknown_options_left_at_their_default_are_ignored(tmp_path: Path) -> None:
    path = _peft_lora(tmp_path)
    edit_config(path, some_future_option=None, another_one=False)
    import_peft(CASES["llama"].build(), path)


def test_other_peft_types_are_refused_with_the_supported_list(tmp_path: Path) -> None:
    model = get_peft_model(
        CASES["llama"].build(),
        LoHaConfig(r=2, target_modules=["q_proj"]),
    )
    model.save_pretrained(tmp_path)
    assert_import_refused(
        tmp_path,
        r"peft_type 'LOHA' is not supported; peftkit imports "
        r"\['ADALORA', 'IA3', 'LORA', 'PREFIX_TUNING'\]",
    )
    assert converters() == {
        "lora": "LORA",
        "adalora": "ADALORA",
        "ia3": "IA3",
        "prefix": "PREFIX_TUNING",
    }


def test_pickle_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*never unpickles.*safe_serialization"):
        import_peft(CASES["llama"].build(), tmp_path)


def test_a_peftkit_checkpoint_points_to_load_adapter(tmp_path: Path) -> None:
    model = CASES["llama"].build()
    peftkit.apply_lora(model, targets=["q_proj"])
    peftkit.save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"peftkit checkpoint.*load_adapter"):
        import_peft(CASES["llama"].build(), tmp_path)


def test_a_directory_of_several_adapters_lists_them(tmp_path: Path) -> None:
    for name in ("first", "second"):
        _peft_lora(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"pass one of \['first', 'second'\]"):
        import_peft(CASES["llama"].build(), tmp_path)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        import_peft(CASES["llama"].build(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        import_peft(CASES["llama"].build(), tmp_path)


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    path = _peft_lora(tmp_path, case="bert", target_modules=["query"])
    assert_import_refused(
        path, "tensors for 'bert.encoder.layer.0.attention.self.query'.*model it was trained on"
    )


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _peft_lora(tmp_path)
    wider = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(wider)
    with pytest.raises(
        InteropError, match=r"shape of default\.model\.layers\.0\.self_attn\.q_proj"
    ):
        import_peft(model, path)
    assert not peftkit.adapters(model)


def test_stray_tensors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _peft_lora(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(tensors, path / "adapter_model.safetensors")
    assert_import_refused(path, r"\['model\.norm\.weight'\] are neither LoRA factors")


def test_half_an_adapter_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _peft_lora(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    assert_import_refused(path, "v_proj: the adapter has only one of lora_A and lora_B")


# -- export ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ScaleConfig(TargetedConfig):
    pass


class ScaleLayer(AdapterLayer):
    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__(base, adapter_name, path)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.gain


class Scale(SwapMethod):
    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        return ScaleLayer(module, self.adapter_name, path)


def test_a_method_without_a_converter_is_refused(tmp_path: Path) -> None:
    model = CASES["llama"].build()
    with temporarily_registered("interop-test-scale", ScaleConfig, Scale):
        peftkit.apply(model, ScaleConfig(targets=["q_proj"]))
        with pytest.raises(
            InteropError,
            match=r"supports methods \['adalora', 'ia3', 'lora', 'prefix'\].*'interop-test-scale'",
        ):
            export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.Conv2d(3, 4, 3, dilation=2), r"dilation=\(2, 2\)"),
        (ScaledEmbedding(10, 4), "ScaledEmbedding changes the embedding in its own forward"),
    ],
)
def test_layers_peft_computes_differently_are_refused(
    tmp_path: Path, module: nn.Module, match: str
) -> None:
    model = Holder(module)
    peftkit.apply_lora(model, targets=["inner"])
    with pytest.raises(InteropError, match=match):
        export_peft(model, tmp_path)


def test_a_second_name_of_a_shared_module_is_refused(tmp_path: Path) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.first, model.second = nn.Sequential(shared), nn.Sequential(shared)
    peftkit.apply_lora(model, targets=["second.0"])  # peft knows this module as first.0 only
    with pytest.raises(InteropError, match=r"\['second\.0'\] are second names"):
        export_peft(model, tmp_path)


def test_export_argument_errors(tmp_path: Path) -> None:
    model = CASES["llama"].build()
    peftkit.apply_lora(model, targets=["q_proj"])
    with pytest.raises(KeyError, match=r"no adapter named 'other'.*\['default'\]"):
        export_peft(model, tmp_path, "other")
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        export_peft(model, tmp_path, task_type="causal")
    (tmp_path / "file").write_text("")
    with pytest.raises(InteropError, match="is a file"):
        export_peft(model, tmp_path / "file")
