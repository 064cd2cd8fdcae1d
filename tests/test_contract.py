"""The contract every registered method keeps, on every tiny model (DESIGN.md, "Tests").

A new built-in method adds one entry to CONTRACT_CONFIGS; the test that checks coverage fails until it
does. A (method, model) pair the method genuinely cannot handle is declared in UNSUPPORTED with the
error it must raise; it is tested for that error, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    MethodConfig,
    PrefixConfig,
)
from peftkit._compat import UnsupportedModelError
from peftkit.registry import spec

from helpers import SEQ2SEQ_PREFIX, SEQ2SEQ_PREFIX_REFUSAL, perturb, snapshot
from zoo import CASES, Case

# The hand-written models have no preset: adapters go after the layers named here.
ADAPTER_TARGETS = {"mlp": ["fc1", "fc2"], "transformer": ["o_proj", "down"]}

# Full fine-tuning runs a different freezing strategy on each model, so the contract covers them all;
# on "mlp" it keeps no copy of the originals, so there the contract checks the refusals instead.
FULL_CONFIGS: dict[str, Callable[[Case], FullConfig]] = {
    "mlp": lambda case: FullConfig(keep_original=False),
    "transformer": lambda case: FullConfig(top_layers=1),
    "gpt2": lambda case: FullConfig(biases_only=True),
    "bert": lambda case: FullConfig(exclude=["embeddings"], modules_to_save=case.head),
    "llama": lambda case: FullConfig(modules=["mlp", "norm"]),
    "t5": lambda case: FullConfig(top_layers=1, exclude=["shared"]),
}

CONTRACT_CONFIGS: dict[str, Callable[[Case], MethodConfig]] = {
    "lora": lambda case: LoraConfig(r=4, alpha=8, modules_to_save=case.head),
    "dora": lambda case: LoraConfig(r=4, alpha=8, dora=True, modules_to_save=case.head),
    "adalora": lambda case: AdaLoraConfig(
        init_r=4, target_r=2, total_steps=10, t_init=2, t_final=2, modules_to_save=case.head
    ),
    "adapter": lambda case: AdapterConfig(
        form="houlsby",
        bottleneck=4,
        layer_norm=True,
        targets=ADAPTER_TARGETS.get(case.name),
        modules_to_save=case.head,
    ),
    "full": lambda case: FULL_CONFIGS[case.name](case),
    "ia3": lambda case: IA3Config(modules_to_save=case.head),
    "prefix": lambda case: PrefixConfig(prefix_length=3, modules_to_save=case.head),
}

# (method, case) -> (exception type, regex its message must match). The message names what is
# supported, so a user learns what to do instead.
PREFIX_SUPPORTED = r"It needs a module \(the transformer body\) whose forward takes input_ids"
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("prefix", "mlp"): (
        TypeError,
        r"TinyMLP: it is not a transformers model\. " + PREFIX_SUPPORTED,
    ),
    ("prefix", "transformer"): (
        TypeError,
        r"TinyTransformer: it is not a transformers model\. " + PREFIX_SUPPORTED,
    ),
}
if not SEQ2SEQ_PREFIX:  # older transformers: the encoder-decoder prefix is refused, naming why
    UNSUPPORTED[("prefix", "t5")] = (UnsupportedModelError, SEQ2SEQ_PREFIX_REFUSAL)

BUILTIN = [n for n in peftkit.methods() if spec(n).method_cls.__module__.startswith("peftkit.")]
# Forms of a registered method that compute something else, each with its own contract config.
VARIANTS = {"dora": "lora"}
CONTRACTED = BUILTIN + list(VARIANTS)
PAIRS = [(m, c) for m in CONTRACTED for c in CASES if (m, c) not in UNSUPPORTED]


def method_spec(name: str) -> Any:
    """The registry entry of a contract name (a variant's is its method's)."""
    return spec(VARIANTS.get(name, name))


def test_every_builtin_method_has_a_contract_config() -> None:
    missing = [m for m in BUILTIN if m not in CONTRACT_CONFIGS]
    assert not missing, f"add contract configs for {missing}"
    stale = [pair for pair in UNSUPPORTED if pair[0] not in CONTRACTED or pair[1] not in CASES]
    assert not stale, f"UNSUPPORTED names unknown methods or models: {stale}"


@pytest.mark.parametrize(("method", "case_name"), sorted(UNSUPPORTED))
def test_unsupported_pairs_raise_a_clear_error_and_leave_the_model_as_it_was(
    method: str, case_name: str
) -> None:
    _, model, config = _setup(method, case_name)
    original = snapshot(model)
    types = {n: type(m) for n, m in model.named_modules()}
    error, message = UNSUPPORTED[(method, case_name)]
    with pytest.raises(error, match=message):
        peftkit.apply(model, config)
    assert not peftkit.adapters(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())
    assert all(p.requires_grad for p in model.parameters())


def _setup(method: str, case_name: str) -> tuple[Case, torch.nn.Module, MethodConfig]:
    case = CASES[case_name]
    return case, case.build(), CONTRACT_CONFIGS[method](case)


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_injection_keeps_output_where_method_starts_at_zero(method: str, case_name: str) -> None:
    case, model, config = _setup(method, case_name)
    with torch.no_grad():
        before = case.output(model)
        peftkit.apply(model, config)
        after = case.output(model)
    if method_spec(method).method_cls.starts_at_identity:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_trainable_parameters_are_exactly_the_adapters(method: str, case_name: str) -> None:
    _, model, config = _setup(method, case_name)
    peftkit.apply(model, config)
    owned = {id(p) for p in peftkit.adapters(model)["default"].parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert owned, "the method owns no parameters"
    assert trainable == owned
    assert {id(p) for p in peftkit.trainable_parameters(model)} == owned


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_save_then_load_on_fresh_base_gives_identical_outputs(
    method: str, case_name: str, tmp_path: Path
) -> None:
    case, model, config = _setup(method, case_name)
    peftkit.apply(model, config)
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(case.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)
    stored = peftkit.checkpoint.read_checkpoint(tmp_path)[1]
    assert stored.keys() == peftkit.adapter_state_dict(model).keys()
    if not method_spec(method).method_cls.trains_base_in_place:
        base_keys = set(case.build().state_dict())
        assert not any(k.split(".", 1)[1] in base_keys for k in stored), "base weights were saved"
    else:  # only the base tensors it trains
        trained = {id(p) for p in peftkit.trainable_parameters(model)}
        assert all(id(t) in trained for t in peftkit.adapter_state_dict(model).values())


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_merge_matches_unmerged_and_leaves_no_mergeable_layer(method: str, case_name: str) -> None:
    case, model, config = _setup(method, case_name)
    peftkit.apply(model, config)
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
        model, report = peftkit.merge_and_unload(model, report=True)
        merged = case.output(model)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    left = [m for m in model.modules() if isinstance(m, peftkit.AdapterLayer)]
    assert all(not layer.mergeable for layer in left), left
    assert report.merged or report.kept


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_one_optimizer_step_changes_only_adapter_parameters(method: str, case_name: str) -> None:
    case, model, config = _setup(method, case_name)
    peftkit.apply(model, config)
    perturb(model)  # so every factor gets a gradient (LoRA's A gets none while B is zero)
    owned = {id(p) for p in peftkit.trainable_parameters(model)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.1)
    model.train()
    case.loss(model).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter_names = {n for n, p in model.named_parameters() if id(p) in owned}
    assert changed, "the step changed nothing"
    assert changed <= adapter_names, sorted(changed - adapter_names)


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_disable_gives_the_base_output(method: str, case_name: str) -> None:
    case, model, config = _setup(method, case_name)
    with torch.no_grad():
        base = case.output(model)
    peftkit.apply(model, config)
    perturb(model)
    with torch.no_grad():
        adapted = case.output(model)
        if not peftkit.adapters(model)["default"].restorable:
            refusal = pytest.raises(RuntimeError, match="kept no copy.*merge_and_unload")
            with refusal, peftkit.disable_adapters(model):
                pass
            torch.testing.assert_close(case.output(model), adapted, rtol=0, atol=0)
            return
        with peftkit.disable_adapters(model):
            disabled = case.output(model)
        again = case.output(model)
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize(("method", "case_name"), PAIRS)
def test_unload_restores_the_original_modules_and_weights_bit_exactly(
    method: str, case_name: str
) -> None:
    _, model, config = _setup(method, case_name)
    original = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    peftkit.apply(model, config)
    perturb(model)
    if not peftkit.adapters(model)["default"].restorable:
        for refused in (peftkit.unload, lambda m: peftkit.delete_adapter(m, "default")):
            with pytest.raises(RuntimeError, match="kept no copy.*merge_and_unload"):
                refused(model)
        assert list(peftkit.adapters(model)) == ["default"]
        return
    peftkit.unload(model)
    after = snapshot(model)
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not peftkit.adapters(model)
