"""Module selection: suffixes, regex, all-linear, layers, exclusions, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig, TargetError, apply_lora
from peftkit.targeting import get_module, iter_modules, layer_index, matches, select

from helpers import perturb
from zoo import CASES, TinyTransformer


def _names(model: nn.Module, **fields: object) -> list[str]:
    return [n for n, _ in select(model, LoraConfig(**fields))]  # type: ignore[arg-type]


def test_suffix_matches_on_dotted_boundaries_only() -> None:
    assert matches("layers.0.q_proj", "q_proj")
    assert matches("q_proj", "q_proj")
    assert matches("layers.0.q_proj", "0.q_proj")
    assert not matches("layers.0.xq_proj", "q_proj")


def test_regex_is_a_full_match() -> None:
    model = TinyTransformer()
    assert _names(model, targets=["re:layers\\.1\\.(q|v)_proj"]) == [
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]
    with pytest.raises(TargetError, match="matched no module"):
        _names(model, targets=["re:q_proj"])  # a full match, not a search


def test_all_linear_skips_the_output_head() -> None:
    model = TinyTransformer()
    names = _names(model, targets="all-linear")
    assert "lm_head" not in names
    assert len(names) == 2 * 6


@pytest.mark.parametrize(
    ("case_name", "head"),
    [("gpt2", "lm_head"), ("bert", "classifier"), ("llama", "lm_head"), ("t5", "lm_head")],
)
def test_all_linear_skips_the_head_of_hf_models(case_name: str, head: str) -> None:
    model = CASES[case_name].build()
    names = _names(model, targets="all-linear")
    assert head not in names and names


def test_layers_and_exclude() -> None:
    model = TinyTransformer()
    names = _names(model, targets=["q_proj", "v_proj", "up"], layers=[1], exclude=["v_proj"])
    assert names == ["layers.1.q_proj", "layers.1.up"]


def test_layer_index_recognises_common_block_lists() -> None:
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("bert.encoder.layer.2.attention.self.query") == 2
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q") == 1
    assert layer_index("lm_head") is None
    assert layer_index("stack.7.fc", layers_pattern="stack") == 7


def test_walk_treats_wrappers_as_the_module_they_wrap() -> None:
    model = TinyTransformer()
    apply_lora(model, targets=["q_proj"])
    names = [n for n, _ in iter_modules(model)]
    assert "layers.0.q_proj" in names
    assert not any(".base" in n or "lora" in n for n in names)
    assert isinstance(get_module(model, "layers.0.q_proj"), peftkit.AdapterLayer)
    # A second adapter on the same module stacks on top of the first.
    apply_lora(model, targets=["q_proj"], adapter_name="second")
    top = get_module(model, "layers.0.q_proj")
    assert top.adapter_name == "second" and top.base.adapter_name == "default"


def test_modules_an_adapter_adds_beside_the_base_are_never_walked_or_targeted() -> None:
    model = TinyTransformer()
    owned = peftkit.AdapterModule()
    owned.proj = nn.Linear(4, 4)
    model.layers[0].extra = owned
    assert not [n for n, _ in iter_modules(model) if "extra" in n]
    assert "layers.0.extra.proj" not in _names(model, targets="all-linear")
    with pytest.raises(TargetError, match="matched no module"):
        _names(model, targets=["extra.proj"])


def _torch_encoder() -> nn.Module:
    model = nn.Sequential()
    model.add_module("enc", nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    model.add_module("head", nn.Linear(16, 3))
    return model.eval()


@pytest.mark.parametrize("targets", [["out_proj"], ["linear1"], "all-linear"])
def test_modules_the_parent_never_calls_are_refused(targets: list[str] | str) -> None:
    # MultiheadAttention reads out_proj.weight; the encoder layer's eval fast path reads every
    # weight. A wrapper there would silently change nothing at inference.
    model = _torch_encoder()
    with pytest.raises(TargetError, match=r"cannot adapt 'enc\.(self_attn\.out_proj|linear1)'"):
        apply_lora(model, targets=targets)
    assert not peftkit.adapters(model)
    with pytest.raises(TargetError, match="modules_to_save cannot adapt 'enc.self_attn.out_proj'"):
        apply_lora(model, targets=["head"], modules_to_save=["out_proj"])


def test_encoder_layer_without_its_fast_path_can_be_adapted() -> None:
    model = _torch_encoder()
    x = torch.randn(2, 5, 16)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        apply_lora(model, targets=["linear1", "linear2"])
        perturb(model, scale=0.5)
        with torch.no_grad():
            y = model(x)
            with peftkit.disable_adapters(model):
                assert not torch.allclose(model(x), y)
            peftkit.merge_and_unload(model)
            torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


class _OneEmbeddingTwoNames(nn.Module):
    """The same Embedding object reached as ``shared`` and ``encoder.embed`` (as transformers 4.x
    builds T5); the forward calls it through ``encoder.embed`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.embed = self.shared
        self.head = nn.Linear(4, 2)

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([[1, 2, 3]])}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.embed(ids))


def test_a_module_reached_by_two_names_is_refused_under_the_name_the_forward_never_calls() -> None:
    pytest.importorskip("transformers")  # the trial forward runs where HF example inputs exist
    model = _OneEmbeddingTwoNames()
    with pytest.raises(TargetError, match=r"never calls it; encoder\.embed hold the same weight"):
        apply_lora(model, r=2, targets=["shared"])
    assert type(model.shared) is nn.Embedding and model.encoder.embed is model.shared
    apply_lora(model, r=2, targets=["encoder.embed"])  # the name that runs is accepted
    assert isinstance(model.encoder.embed, peftkit.AdapterLayer)
