"""Reliability corpus, applying methods: every pattern-valued field must match, names are checked
whole, operations on several adapters check every name before changing anything, wrapped models
are refused, and a module the forward never calls is not adapted. Each case ends in an error that
names the fix with the model left exactly as it was, or in a correct result.

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import TargetError, apply_adalora, apply_full, apply_lora

from helpers import perturb, snapshot
from zoo import CASES, TinyTransformer


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], dict[str, bool]]:
    return (
        snapshot(model),
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model: nn.Module, before: Any) -> None:
    weights, types, flags = _state(model)
    assert all(torch.equal(weights[k], before[0][k]) for k in before[0])
    assert weights.keys() == before[0].keys() and (types, flags) == (before[1], before[2])
    assert not peftkit.adapters(model)


def _bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=50,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=32,
    )
    return BartForConditionalGeneration(config).eval()


REGEX_FIX = r"rewrite it without a repeated group"
# (model, action, error, message): the action must fail naming the fix, and leave the model as it was.
REFUSED: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any], type, str]] = {
    "exclude-typo": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj", "v_proj"], exclude=["q_prj"]),
        TargetError,
        "exclude 'q_prj' matched no module; closest names: q_proj",
    ),
    "rank-pattern-typo": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], rank_pattern={"q_prj": 8}),
        TargetError,
        "rank_pattern key 'q_prj' matched no module; closest names: q_proj",
    ),
    "alpha-pattern-typo": (
        _tiny,
        lambda m: apply_lora(m, targets=["v_proj"], alpha_pattern={"v_prj": 8.0}),
        TargetError,
        "alpha_pattern key 'v_prj' matched no module; closest names: v_proj",
    ),
    "rank-pattern-for-an-untargeted-module": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], rank_pattern={"v_proj": 8}),
        TargetError,
        "rank_pattern key 'v_proj' matched no module; closest names: q_proj",
    ),
    "full-exclude-typo": (
        _tiny,
        lambda m: apply_full(m, modules=["layers.0"], exclude=["nrom1"]),
        TargetError,
        "exclude 'nrom1' matched no module; closest names: norm1",
    ),
    "layers-partly-out-of-range": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], layers=[0, 7]),
        TargetError,
        r"layers=\[0, 7\]: no selected module sits in block \[7\]; the selected modules sit in "
        "blocks 0-1",
    ),
    "layers-all-out-of-range": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], layers=[2, 3]),
        TargetError,
        r"no selected module sits in block \[2, 3\]; the selected modules sit in blocks 0-1",
    ),
    "target-also-in-modules-to-save": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
        TargetError,
        "'lm_head' is selected by both targets and modules_to_save: a module either trains in full",
    ),
    "adapter-name-trailing-newline": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], adapter_name="a\n"),
        ValueError,
        r"adapter_name 'a\\n' must be letters, digits, '_' or '-'",
    ),
    "adapter-name-empty": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], adapter_name=""),
        ValueError,
        "adapter_name '' must be letters, digits",
    ),
    "adapter-name-not-a-string": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], adapter_name=3),
        ValueError,
        "adapter_name 3 must be letters, digits",
    ),
    "regex-nested-repeat": (
        _tiny,
        lambda m: apply_lora(m, targets=["re:(.*)*Z"]),
        ValueError,
        r"targets entry 're:\(\.\*\)\*Z'.*can take exponential time to match; " + REGEX_FIX,
    ),
    "regex-repeated-alternatives": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], exclude=["re:(a|a)*Z"]),
        ValueError,
        "repeats a group that itself repeats or has alternatives",
    ),
    "regex-too-many-repeats": (
        _tiny,
        lambda m: apply_lora(m, targets=["re:" + ".*a" * 4]),
        ValueError,
        r"has 4 repetitions \(\*, \+, \{m,n\}\); at most 3 are accepted",
    ),
    "regex-invalid": (
        _tiny,
        lambda m: apply_lora(m, targets=["re:layers.(0"]),
        ValueError,
        r"'layers\.\(0' is not a valid regular expression \(missing \)",
    ),
    "regex-too-long": (
        _tiny,
        lambda m: apply_lora(m, targets=["re:" + "q" * 600]),
        ValueError,
        "the regular expression is 600 characters long; at most 500",
    ),
    "regex-in-rank-pattern": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], rank_pattern={"re:(q+)+": 4}),
        ValueError,
        "rank_pattern key entry 're:\\(q\\+\\)\\+'.*exponential time",
    ),
    "rank-pattern-not-a-mapping": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], rank_pattern=["q_proj"]),
        ValueError,
        r"rank_pattern must map module patterns to values, e.g. rank_pattern=\{'o_proj': 16\}",
    ),
    "dropout-a-bool": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], dropout=False),
        ValueError,
        r"dropout must be in \[0, 1\), got False",
    ),
    "layers-pattern-not-a-string": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], layers=[0], layers_pattern=5),
        ValueError,
        "layers_pattern must be a non-empty name such as 'layers'",
    ),
    "t5-shared-embedding": (
        CASES["t5"].build,
        lambda m: apply_lora(m, targets=["shared", "q"]),
        TargetError,
        r"lora cannot adapt 'shared': the model's forward never calls it; encoder\.embed_tokens, "
        r"decoder\.embed_tokens.*hold the same weight.*targets=\['embed_tokens'\]",
    ),
    "bart-shared-embedding": (
        _bart,
        lambda m: apply_lora(m, targets=["shared"]),
        TargetError,
        r"cannot adapt 'model\.shared': the model's forward never calls it; "
        r"model\.encoder\.embed_tokens",
    ),
    "t5-shared-in-modules-to-save": (
        CASES["t5"].build,
        lambda m: apply_lora(m, targets=["q"], modules_to_save=["shared"]),
        TargetError,
        "modules_to_save cannot adapt 'shared': the model's forward never calls it",
    ),
    "data-parallel": (
        _tiny,
        lambda m: apply_lora(nn.DataParallel(m), targets=["q_proj"]),
        TypeError,
        r"the model is wrapped in DataParallel; apply or load adapters before wrapping it",
    ),
    "torch-compile": (
        _tiny,
        lambda m: apply_lora(torch.compile(m), targets=["q_proj"]),
        TypeError,
        "the model is wrapped in torch.compile; apply or load adapters before wrapping it",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_apply_names_the_fix_and_leaves_the_model_as_it_was(case: str) -> None:
    make, action, error, message = REFUSED[case]
    model = make()
    before = _state(model)
    with pytest.raises(error, match=message):
        action(model)
    _assert_unchanged(model, before)


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP's notes on CPU use and its successor
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


DISTRIBUTED: dict[str, tuple[Callable[[nn.Module], nn.Module], str]] = {
    "ddp": (nn.parallel.DistributedDataParallel, r"wrapped in DistributedDataParallel; apply or"),
    "fsdp": (_fsdp, r"wrapped in FSDP \(FullyShardedDataParallel\); apply or load adapters"),
    "fully-shard": (_fully_shard, r"wrapped in FSDP \(FSDPTinyTransformer\); apply or load"),
}


@pytest.mark.parametrize("case", list(DISTRIBUTED))
def test_distributed_wrapper_is_refused(case: str, tmp_path: Path) -> None:
    import torch.distributed as dist

    wrap, message = DISTRIBUTED[case]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        wrapped = wrap(_tiny())
        before = _state(wrapped)
        with pytest.raises(TypeError, match=message):
            apply_lora(wrapped, targets=["q_proj"])
        _assert_unchanged(wrapped, before)
    finally:
        dist.destroy_process_group()


# -- what a valid pattern or name does ------------------------------------------------------------
def test_a_bounded_regex_selects_what_it_says() -> None:
    model = apply_lora(_tiny(), targets=[r"re:layers\.\d+\.(q|v)_proj"], rank_pattern={"v_proj": 2})
    ranks = {layer.path: layer.r for layer in peftkit.adapters(model)["default"].layers}
    assert ranks == {
        "layers.0.q_proj": 8,
        "layers.0.v_proj": 2,
        "layers.1.q_proj": 8,
        "layers.1.v_proj": 2,
    }


def test_t5_embed_tokens_aliases_are_adapted_and_change_the_output() -> None:
    case = CASES["t5"]
    model = case.build()
    base = case.output(model).detach()
    apply_lora(model, targets=["embed_tokens"])
    perturb(model)
    paths = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert paths == ["encoder.embed_tokens", "decoder.embed_tokens"]
    assert not torch.allclose(case.output(model), base)


def test_gpt2_input_embedding_tied_to_the_head_is_adapted() -> None:
    model = CASES["gpt2"].build()
    apply_lora(model, targets=["wte"])
    assert [layer.path for layer in peftkit.adapters(model)["default"].layers] == [
        "transformer.wte"
    ]


# -- operations on several adapters -----------------------------------------------------------------
def _two() -> nn.Module:
    model = _tiny()
    apply_lora(model, targets=["q_proj"], adapter_name="a")
    apply_lora(model, targets=["v_proj"], adapter_name="task")
    perturb(model)
    return model


MULTI: dict[str, tuple[Callable[[nn.Module, Path], Any], type, str]] = {
    "merge-and-unload-unknown-second-name": (
        lambda m, d: peftkit.merge_and_unload(m, ["a", "bb"]),
        KeyError,
        r"no adapter named \['bb'\]; the model has \['a', 'task'\]",
    ),
    "merge-unknown-second-name": (
        lambda m, d: peftkit.merge(m, ["a", "bb"]),
        KeyError,
        r"no adapter named \['bb'\]",
    ),
    "merge-a-misspelt-string": (
        lambda m, d: peftkit.merge(m, "tsk"),
        KeyError,
        r"no adapter named \['tsk'\]",
    ),
    "merge-names-not-a-list": (
        lambda m, d: peftkit.merge(m, 5),
        TypeError,
        r"adapter_names must be a name or a list of names such as \['default'\], got 5",
    ),
    "set-active-unknown-second-name": (
        lambda m, d: peftkit.set_active(m, ["a", "bb"]),
        KeyError,
        r"no adapter named \['bb'\]",
    ),
    "save-unknown-second-name": (
        lambda m, d: peftkit.save_adapter(m, d, ["a", "bb"]),
        KeyError,
        r"no adapter named \['bb'\]",
    ),
    "delete-a-list": (
        lambda m, d: peftkit.delete_adapter(m, ["a"]),
        TypeError,
        r"an adapter name is a str such as 'default', got \['a'\]",
    ),
}


@pytest.mark.parametrize("case", list(MULTI))
def test_operation_on_several_adapters_checks_every_name_first(case: str, tmp_path: Path) -> None:
    action, error, message = MULTI[case]
    model = _two()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        action(model, tmp_path / "out")
    assert list(peftkit.adapters(model)) == ["a", "task"]
    assert peftkit.active_adapters(model) == ["a", "task"]
    assert not any(layer.merged for m in peftkit.adapters(model).values() for layer in m.layers)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert not (tmp_path / "out").exists()


def test_a_refused_adalora_merge_merges_nothing_else() -> None:
    model = _tiny()
    apply_lora(model, targets=["q_proj"], adapter_name="a")
    apply_adalora(model, total_steps=10, targets=["v_proj"], adapter_name="ada")
    for _ in range(3):  # trained past t_init (1 of 10 steps), but no step_hooks
        model(torch.randint(50, (2, 6))).sum().backward()
    with pytest.raises(RuntimeError, match="its rank allocator never did"):
        peftkit.merge(model, ["a", "ada"])
    assert not any(layer.merged for layer in peftkit.adapters(model)["a"].layers)


def test_one_string_is_one_adapter_name(tmp_path: Path) -> None:
    model = _two()
    assert {k.split(".")[0] for k in peftkit.adapter_state_dict(model, "task")} == {"task"}
    peftkit.save_adapter(model, tmp_path, "task")
    peftkit.merge(model, "task")
    assert [m.adapter_name for m in peftkit.adapters(model).values() if m.layers[0].merged] == [
        "task"
    ]
    fresh = peftkit.load_adapter(_tiny(), tmp_path, "task")
    assert list(peftkit.adapters(fresh)) == ["task"]
