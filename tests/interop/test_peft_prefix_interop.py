"""Prefix-tuning adapters shared with the real HF ``peft`` package, both directions.

Each test trains a prefix for a few steps in one library on a tiny GPT-2, Llama or BERT classifier,
converts it through the files, loads it in the other library on a fresh copy of the base, and
compares logits in float32 with ``atol=1e-5, rtol=1e-5``. Adapters that count positions after the
prefix (peft's way, ``positions_after_prefix=True``) convert by copying and give bit-identical
logits; a Llama prefix with the base positions is exported by rotating its keys (measured
differences below 1e-6).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from torch import nn

import peftkit
from peftkit.interop import InteropError, export_peft, import_peft
from peftkit.methods.prefix import PrefixConfig

from interop_helpers import assert_import_refused
from zoo import CASES, Case

TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}
TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def train(case: Case, model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        case.loss(model).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(case: Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model)


def assert_same_and_trained(
    case: Case, got: torch.Tensor, expected: torch.Tensor, exact: bool = False
) -> None:
    torch.testing.assert_close(got, expected, **({"atol": 0, "rtol": 0} if exact else TOL))
    assert (expected - logits(case, case.build())).abs().max() > 1e-3, "training changed nothing"


@contextmanager
def peft_runs_it() -> Iterator[None]:
    """Skip (naming both versions) where peft itself cannot run prefix-tuning on the model.

    peft 0.21 looks for ``past_key_values`` in the signature of the model's forward; from
    transformers 5.24 the encoders' forward takes ``cache`` instead, so peft refuses BERT there.
    """
    try:
        yield
    except ValueError as err:
        if "does not support past key values" not in str(err):
            raise
        pytest.skip(
            f"peft {peft.__version__} cannot run prefix-tuning on this model with transformers "
            f"{transformers.__version__} ({err})"
        )


def peft_from_pretrained(case: Case, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Tt]oken type ids.*")
        return PeftModel.from_pretrained(case.build(), path).eval()


# -- peftkit -> peft ---------------------------------------------------------------------------
EXPORTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-mlp": ("gpt2", {"positions_after_prefix": True, "mlp_hidden": 16}),
    "llama-base-positions": ("llama", {"init_std": 0.3}),
    "llama-mlp-base-positions": ("llama", {"mlp_hidden": 8}),
    "llama-after-prefix": ("llama", {"init_std": 0.3, "positions_after_prefix": True}),
    "bert": ("bert", {"positions_after_prefix": True, "modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_trained_in_peftkit_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    case_name, fields = EXPORTS[name]
    case = CASES[case_name]
    model = case.build()
    peftkit.apply_prefix(model, prefix_length=3, **fields)
    train(case, model)
    export_peft(model, tmp_path, task_type=TASKS[case_name])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert config["prefix_projection"] is False  # the MLP, if any, is folded into the prefix
    loaded = peft_from_pretrained(case, tmp_path)
    exact = bool(fields.get("positions_after_prefix"))
    with peft_runs_it():
        expected = logits(case, loaded)
    assert_same_and_trained(case, expected, logits(case, model), exact=exact)


def test_llama_export_writes_the_kv_head_layout(tmp_path: Path) -> None:
    """Grouped-query attention: peft's num_attention_heads / token_dim are the key/value heads'."""
    model = CASES["llama"].build()
    peftkit.apply_prefix(model, prefix_length=2)
    export_peft(model, tmp_path, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 16)


# -- peft -> peftkit ---------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("case_name", list(TASKS))
def test_trained_in_peft_imports_into_peftkit_with_the_same_logits(
    case_name: str, projection: bool, tmp_path: Path
) -> None:
    case = CASES[case_name]
    config = PrefixTuningConfig(
        num_virtual_tokens=3,
        task_type=TASKS[case_name],
        prefix_projection=projection,
        encoder_hidden_size=16,
    )
    trained = get_peft_model(case.build(), config)
    with peft_runs_it():
        train(case, trained)
    trained.save_pretrained(tmp_path)
    model = import_peft(case.build(), tmp_path)
    # Bit-identical to peft computing from the same saved prefix; peft's live MLP (projection)
    # computes that prefix in another order, so it agrees within rounding (about 1e-7).
    reloaded = logits(case, peft_from_pretrained(case, tmp_path))
    assert_same_and_trained(case, logits(case, model), reloaded, exact=True)
    assert_same_and_trained(case, logits(case, model), logits(case, trained))
    imported = peftkit.adapters(model)["default"].config
    assert isinstance(imported, PrefixConfig) and imported.positions_after_prefix
    assert imported.prefix_length == 3 and imported.mlp_hidden is None
    # A normal peftkit adapter: it saves and loads with the same outputs.
    peftkit.save_adapter(model, tmp_path / "peftkit")
    again = peftkit.load_adapter(case.build(), tmp_path / "peftkit")
    torch.testing.assert_close(logits(case, again), logits(case, model), rtol=0, atol=0)


def test_round_trip_through_the_peft_format_is_exact(tmp_path: Path) -> None:
    case = CASES["gpt2"]
    model = case.build()
    peftkit.apply_prefix(model, prefix_length=4, positions_after_prefix=True, init_std=0.3)
    train(case, model)
    export_peft(model, tmp_path, task_type="CAUSAL_LM")
    again = import_peft(case.build(), tmp_path)
    torch.testing.assert_close(logits(case, again), logits(case, model), rtol=0, atol=0)


def test_an_imported_prefix_generates_like_peft(tmp_path: Path) -> None:
    case = CASES["llama"]
    trained = get_peft_model(
        case.build(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    train(case, trained)
    trained.save_pretrained(tmp_path)
    model = import_peft(case.build(), tmp_path)
    ids = case.inputs()["input_ids"][:1]
    args = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = greedy_by_full_forward(trained, ids, steps=6)
        assert torch.equal(model.generate(input_ids=ids, **args), expected)
        assert torch.equal(model.generate(input_ids=ids, use_cache=False, **args), expected)


def greedy_by_full_forward(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by running the whole sequence through ``model`` at every step.

    The reference is peft's forward, not its ``generate``: peft 0.21's cached generation ignores
    the prefix on transformers 5.24 (it passes ``past_key_values``, transformers keeps ``cache``),
    and its uncached generation breaks on 4.57 (a mask of the wrong length).
    """
    for _ in range(steps):
        following = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, following], dim=1)
    return ids


# -- what cannot be converted ------------------------------------------------------------------
def test_gpt2_prefix_with_base_positions_is_refused_naming_the_fix(tmp_path: Path) -> None:
    model = CASES["gpt2"].build()
    peftkit.apply_prefix(model, prefix_length=3)
    with pytest.raises(InteropError, match=r"PrefixConfig\(positions_after_prefix=True\)"):
        export_peft(model, tmp_path, task_type="CAUSAL_LM")
    assert not any(tmp_path.iterdir())


def test_export_without_a_task_type_is_refused(tmp_path: Path) -> None:
    model = CASES["llama"].build()
    peftkit.apply_prefix(model, prefix_length=3)
    with pytest.raises(InteropError, match='pass task_type .*"CAUSAL_LM"'):
        export_peft(model, tmp_path)


def test_an_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    config = PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    get_peft_model(CASES["gpt2"].build(), config).save_pretrained(tmp_path)
    assert_import_refused(
        tmp_path, "made for a cache of .*import it into the model it was trained on"
    )


def test_an_encoder_decoder_prefix_is_refused(tmp_path: Path) -> None:
    config = PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM")
    get_peft_model(CASES["t5"].build(), config).save_pretrained(tmp_path)
    assert_import_refused(
        tmp_path,
        "encoder-decoder prefix: peft lays out .* decoder's self-attention only",
        case="t5",
    )
