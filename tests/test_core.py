"""Model-level operations: named adapters, switching, deleting, merging stacks, saved modules."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit import apply_lora

from helpers import has_adapter_layers, perturb, snapshot
from zoo import CASES, TinyTransformer


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))


def _only(name: str, seed: int, targets: list[str]) -> torch.Tensor:
    """Output of a model carrying just one adapter built like the named one in the two-adapter tests."""
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=4, targets=targets, adapter_name=name)
    perturb(model, seed=seed)
    with torch.no_grad():
        return model(_ids())


@pytest.fixture
def two_adapters() -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=4, targets=["q_proj", "v_proj"], adapter_name="a")
    perturb(model, seed=1)
    apply_lora(model, r=4, targets=["v_proj", "up"], adapter_name="b")
    with torch.no_grad():
        for p in peftkit.adapters(model)["b"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    return model


def test_adapters_stack_and_switch(two_adapters: torch.nn.Module) -> None:
    model = two_adapters
    assert list(peftkit.adapters(model)) == ["a", "b"]
    assert peftkit.active_adapters(model) == ["a", "b"]
    peftkit.set_active(model, "a")
    with torch.no_grad():
        only_a = model(_ids())
    torch.testing.assert_close(only_a, _only("a", 1, ["q_proj", "v_proj"]))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in peftkit.adapters(model)["a"].parameters()}
    peftkit.set_active(model, ["a", "b"])
    with torch.no_grad():
        both = model(_ids())
    assert not torch.allclose(both, only_a)


def test_set_active_unknown_name_lists_adapters(two_adapters: torch.nn.Module) -> None:
    with pytest.raises(KeyError, match=r"\['c'\].*\['a', 'b'\]"):
        peftkit.set_active(two_adapters, ["a", "c"])


def test_delete_middle_of_a_stack_keeps_the_rest(two_adapters: torch.nn.Module) -> None:
    model = two_adapters
    b_before = {k: v.clone() for k, v in peftkit.adapter_state_dict(model, ["b"]).items()}
    peftkit.delete_adapter(model, "a")
    assert list(peftkit.adapters(model)) == ["b"]
    assert peftkit.adapter_state_dict(model).keys() == b_before.keys()
    v_proj = model.layers[0].v_proj
    assert v_proj.adapter_name == "b" and isinstance(v_proj.base, torch.nn.Linear)
    assert isinstance(model.layers[0].q_proj, torch.nn.Linear)


def test_merge_stack_then_unmerge(two_adapters: torch.nn.Module) -> None:
    model = two_adapters
    base_w = model.layers[0].v_proj.base_layer().weight.detach().clone()
    with torch.no_grad():
        expected = model(_ids())
        report = peftkit.merge(model)
        assert len(report.merged) == 2 * 2 + 2 * 2
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(model.layers[0].v_proj.base_layer().weight, base_w)
        with pytest.raises(RuntimeError, match="unmerge"), peftkit.disable_adapters(model):
            pass
        peftkit.unmerge(model)
        torch.testing.assert_close(
            model.layers[0].v_proj.base_layer().weight, base_w, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)


def test_switching_off_a_merged_adapter_is_refused(two_adapters: torch.nn.Module) -> None:
    # Its update lives in the base weights: making only "b" active would still compute with "a".
    model = two_adapters
    peftkit.set_active(model, "b")
    with torch.no_grad():
        only_b = model(_ids())
    peftkit.set_active(model, "a")
    peftkit.merge(model, ["a"])
    with pytest.raises(RuntimeError, match=r"'a' is merged.*unmerge"):
        peftkit.set_active(model, "b")
    assert peftkit.active_adapters(model) == ["a"]
    peftkit.unmerge(model)
    peftkit.set_active(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), only_b, rtol=1e-5, atol=1e-5)


def test_loading_adapter_tensors_into_a_merged_adapter_is_refused(
    two_adapters: torch.nn.Module,
) -> None:
    # unmerge subtracts delta_weight(): after a load it would subtract the new update, not the
    # merged one, leaving the base weights changed for good.
    model = two_adapters
    tensors = {k: v.clone() + 1 for k, v in peftkit.adapter_state_dict(model).items()}
    weight = model.layers[0].v_proj.base_layer().weight.detach().clone()
    peftkit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        peftkit.load_adapter_state_dict(model, tensors)
    peftkit.unmerge(model)
    torch.testing.assert_close(
        model.layers[0].v_proj.base_layer().weight, weight, atol=1e-6, rtol=0
    )
    peftkit.load_adapter_state_dict(model, tensors)


def test_merge_keeps_a_layer_that_wraps_a_saved_module() -> None:
    # The saved module computes with its trained copy; folding the outer LoRA into the original
    # module's weight (which the merged saved module no longer uses) would drop the update.
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=2, targets=["q_proj"], modules_to_save=["up"], adapter_name="a")
    apply_lora(model, r=2, targets=["up"], adapter_name="b")
    perturb(model)
    with torch.no_grad():
        expected = model(_ids())
        report = peftkit.merge(model)
        assert any(
            k.startswith("b:") and "modules_to_save" in why for k, why in report.kept.items()
        )
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)
        peftkit.merge_and_unload(model)
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_inactive_adapter_is_kept_and_reported(
    two_adapters: torch.nn.Module,
) -> None:
    model = two_adapters
    peftkit.set_active(model, "a")
    with torch.no_grad():
        expected = model(_ids())
    model, report = peftkit.merge_and_unload(model, report=True)
    assert list(peftkit.adapters(model)) == ["b"]
    assert all(name.startswith("a:") for name in report.merged)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)
    model, report_b = peftkit.merge_and_unload(model, ["b"], report=True)
    assert report_b.kept and all("inactive" in why for why in report_b.kept.values())


def test_merge_and_unload_everything_gives_a_plain_model() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, targets=["q_proj"])
    peftkit.merge_and_unload(model)
    assert not has_adapter_layers(model) and not peftkit.adapters(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "_peftkit")


def test_unload_after_merge_restores_base_within_rounding(two_adapters: torch.nn.Module) -> None:
    torch.manual_seed(0)
    original = snapshot(TinyTransformer())
    model = two_adapters
    peftkit.merge(model)
    peftkit.unload(model)
    restored = snapshot(model)
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_modules_to_save_trains_a_copy_and_disable_restores_the_original() -> None:
    case = CASES["bert"]
    model = case.build()
    original_head = model.classifier
    head_weight = model.classifier.weight.detach().clone()
    apply_lora(model, r=2, targets=["query", "value"], modules_to_save=["classifier"])
    saved = model.classifier
    assert isinstance(saved, peftkit.SavedModule) and saved.base is original_head
    assert saved.trained.weight.requires_grad and not original_head.weight.requires_grad
    perturb(model)
    assert torch.equal(original_head.weight, head_weight)
    with torch.no_grad(), peftkit.disable_adapters(model):
        torch.testing.assert_close(case.output(model), case.output(case.build()))
    peftkit.merge_and_unload(model)
    assert model.classifier is saved.trained


def test_deepcopy_keeps_adapters_consistent() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, targets=["q_proj"])
    perturb(model)
    clone = copy.deepcopy(model)
    layer = clone.layers[0].q_proj
    assert peftkit.adapters(clone)["default"].layers[0] is layer
    with torch.no_grad():
        torch.testing.assert_close(clone(_ids()), model(_ids()))
    peftkit.unload(clone)
    assert has_adapter_layers(model) and not has_adapter_layers(clone)


def test_regularizer_and_step_hooks_are_no_ops_for_lora() -> None:
    model = TinyTransformer()
    apply_lora(model, targets=["q_proj"])
    assert peftkit.regularizer(model) is None
    peftkit.step_hooks(model, 0)
