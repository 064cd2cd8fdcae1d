"""Full fine-tuning as a method: freezing strategies, in-place training with exact restore, what is
saved, merging, the keep_original=False refusals, and interplay with wrapping adapters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import FullConfig, apply_full, apply_lora

from helpers import perturb, snapshot
from zoo import CASES, TinyMLP, TinyTransformer


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_trains_every_parameter_in_place() -> None:
    model = _model()
    names = {n for n, _ in model.named_parameters()}
    apply_full(model)
    assert _trainable(model) == names
    assert peftkit.trainable_summary(model).trainable == sum(p.numel() for p in model.parameters())
    assert set(peftkit.adapter_state_dict(model)) == {f"default.{n}" for n in names}


def test_tied_weights_are_trained_and_saved_once() -> None:
    model = CASES["gpt2"].build()
    apply_full(model)
    keys = set(peftkit.adapter_state_dict(model))
    assert "default.transformer.wte.weight" in keys and "default.lm_head.weight" not in keys
    ids = [id(p) for p in peftkit.trainable_parameters(model)]
    assert len(ids) == len(set(ids))


def test_biases_only_is_bitfit() -> None:
    model = CASES["bert"].build()
    apply_full(model, biases_only=True)
    trained = _trainable(model)
    assert trained and all(n.endswith(".bias") for n in trained)
    assert trained == {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def test_biases_only_on_a_model_without_biases_says_so() -> None:
    with pytest.raises(peftkit.TargetError, match="selects no parameter.*no biases"):
        apply_full(CASES["llama"].build(), biases_only=True)


def test_top_layers_keeps_the_last_blocks() -> None:
    model = _model()
    apply_full(model, top_layers=1)
    assert _trainable(model) == {
        n for n, _ in model.named_parameters() if n.startswith("layers.1.")
    }


def test_top_layers_counts_each_block_list_of_t5_separately() -> None:
    model = CASES["t5"].build()
    apply_full(model, top_layers=1)
    blocks = {".".join(n.split(".")[:3]) for n in _trainable(model)}
    assert blocks == {"encoder.block.1", "decoder.block.1"}


def test_top_layers_with_a_saved_head_and_biases_only_intersect() -> None:
    model = _model()
    apply_full(model, top_layers=1, biases_only=True, modules_to_save=["lm_head"])
    trained = _trainable(model)
    in_place = {n for n in trained if not n.startswith("lm_head.")}
    assert in_place and all(n.startswith("layers.1.") and n.endswith(".bias") for n in in_place)
    assert "lm_head.trained.weight" in trained and "lm_head.base.weight" not in trained


@pytest.mark.parametrize(
    ("model", "fields", "message"),
    [
        (TinyMLP(), {"top_layers": 1}, "no parameter sits in a block list.*layers_pattern"),
        (TinyTransformer(), {"top_layers": 3}, "'layers' has 2 blocks"),
        (TinyTransformer(), {"modules": ["q_prj"]}, "modules 'q_prj' matched no module.*q_proj"),
    ],
)
def test_bad_selection_names_the_fix(
    model: torch.nn.Module, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(peftkit.TargetError, match=message):
        apply_full(model, **fields)  # type: ignore[arg-type]
    assert not peftkit.adapters(model)
    assert all(p.requires_grad for p in model.parameters())


def test_modules_and_exclude() -> None:
    model = _model()
    apply_full(model, modules=["layers"], exclude=["norm1", "norm2", "bias"])
    trained = _trainable(model)
    assert trained and all(n.startswith("layers.") and n.endswith(".weight") for n in trained)
    assert not any("norm" in n for n in trained)


def test_layers_pattern_names_an_unusual_block_list() -> None:
    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    model = Stack()
    apply_full(model, top_layers=2, layers_pattern="stages")
    assert _trainable(model) == {f"stages.{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}


def test_disable_swaps_storages_and_restores_bit_exactly() -> None:
    model = _model()
    original = snapshot(model)
    apply_full(model)
    perturb(model)
    trained = snapshot(model)
    weight = model.layers[0].q_proj.weight
    trained_ptr = weight.data_ptr()
    with torch.no_grad(), peftkit.disable_adapters(model):
        assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())
        assert weight.data_ptr() != trained_ptr and not weight.requires_grad
    assert weight.data_ptr() == trained_ptr and weight.requires_grad  # swapped back, not copied
    assert all(torch.equal(v, trained[k]) for k, v in snapshot(model).items())


def test_set_active_switches_between_full_and_lora() -> None:
    model = _model()
    apply_full(model, biases_only=True, adapter_name="bitfit")
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="lora")
    perturb(model)
    bias = model.layers[0].q_proj.bias
    trained_bias = bias.detach().clone()
    peftkit.set_active(model, "lora")
    assert not bias.requires_grad and not torch.equal(bias, trained_bias)
    assert {id(p) for p in peftkit.trainable_parameters(model)} == {
        id(p) for p in peftkit.adapters(model)["lora"].parameters()
    }
    peftkit.set_active(model, ["bitfit", "lora"])
    assert bias.requires_grad and torch.equal(bias, trained_bias)


def test_inactive_adapter_saves_its_trained_values_and_loads_inactive(tmp_path: Path) -> None:
    model = _model()
    apply_full(model, modules=["o_proj"], adapter_name="a")
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="b")
    perturb(model)
    with torch.no_grad():
        both = model(_ids())
    peftkit.set_active(model, "b")
    with torch.no_grad():
        only_b = model(_ids())
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(_model(), tmp_path)
    assert peftkit.active_adapters(fresh) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), only_b, rtol=0, atol=0)
        peftkit.set_active(fresh, ["a", "b"])
        torch.testing.assert_close(fresh(_ids()), both, rtol=0, atol=0)


def test_merge_reports_the_parameters_and_keeps_disable_working() -> None:
    model = _model()
    original = snapshot(model)
    apply_full(model, modules=["o_proj"])
    perturb(model)
    report = peftkit.merge(model)
    assert sorted(report.merged) == [
        f"default:layers.{i}.o_proj.{k}" for i in (0, 1) for k in ("bias", "weight")
    ]
    with peftkit.disable_adapters(model):
        assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())


def test_merge_and_unload_keeps_the_trained_weights() -> None:
    model = _model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_full(model, top_layers=1)
    perturb(model)
    trained = snapshot(model)
    peftkit.merge_and_unload(model)
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, trained[k]) for k, v in snapshot(model).items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_without_the_original_copy_disable_and_unload_are_refused() -> None:
    model = _model()
    apply_full(model, keep_original=False)
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="lora")
    method = peftkit.adapters(model)["default"]
    assert not method.restorable and method.describe()["original copy"] == "none"
    perturb(model)
    before = snapshot(model)
    fix = r"kept no copy.*merge_and_unload\(model, \['default'\]\)"
    for refused in (
        lambda: peftkit.set_active(model, "lora"),
        lambda: peftkit.delete_adapter(model, "default"),
        lambda: peftkit.unload(model),
    ):
        with pytest.raises(RuntimeError, match=fix):
            refused()
    with pytest.raises(RuntimeError, match=fix), peftkit.disable_adapters(model):
        pass
    assert peftkit.active_adapters(model) == ["default", "lora"]  # nothing was switched
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    peftkit.delete_adapter(model, "lora")
    peftkit.merge_and_unload(model)
    assert not peftkit.adapters(model)


def test_the_original_copy_costs_one_copy_of_the_trained_parameters() -> None:
    model = _model()
    apply_full(model, modules=["layers.0"])
    size = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("layers.0."))
    assert peftkit.adapters(model)["default"].describe()["original copy"] == (
        f"{size / 2**20:.1f} MiB"
    )


def test_two_full_adapters_must_train_disjoint_parameters() -> None:
    model = _model()
    apply_full(model, modules=["layers.0"], adapter_name="a")
    apply_full(model, modules=["layers.1"], adapter_name="b")
    with pytest.raises(ValueError, match="adapter 'a' already trains.*disjoint"):
        apply_full(model, biases_only=True, adapter_name="c")
    assert list(peftkit.adapters(model)) == ["a", "b"]


def test_a_merged_layer_on_trained_weights_blocks_switching_until_unmerged() -> None:
    model = _model()
    original = snapshot(model)
    apply_full(model, modules=["q_proj"], adapter_name="full")
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="lora")
    perturb(model)
    with torch.no_grad():
        expected = model(_ids())
    peftkit.merge(model, ["lora"])
    with pytest.raises(RuntimeError, match=r"layers.0.q_proj.*peftkit.unmerge\(model\)"):
        peftkit.set_active(model, "lora")
    with pytest.raises(RuntimeError, match="unmerge"):
        peftkit.delete_adapter(model, "full")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)
    peftkit.unload(model)  # unmerges first, then restores the originals
    for key, value in snapshot(model).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)


def test_unloading_a_merge_into_weights_trained_with_a_kept_original_is_refused() -> None:
    # Restoring the kept original (disable, delete, unload) would silently drop an update merged
    # into the weight for good; a reversible merge, or unloading the full adapter first, is fine.
    model = _model()
    apply_full(model, modules=["q_proj"], adapter_name="full")
    apply_lora(model, r=2, targets=["q_proj", "v_proj"], adapter_name="lora")
    perturb(model)
    with torch.no_grad():
        expected = model(_ids())
    model, report = peftkit.merge_and_unload(model, ["lora"], report=True)
    assert all(
        "q_proj" in k and "merge_and_unload that adapter" in w for k, w in report.kept.items()
    )
    assert len(report.kept) == 2 and all("v_proj" in name for name in report.merged)
    # full first (applied first), then lora
    model, report = peftkit.merge_and_unload(model, report=True)
    assert not report.kept and not peftkit.adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), expected, rtol=1e-5, atol=1e-5)


def test_training_weights_that_hold_a_merged_update_is_refused() -> None:
    model = _model()
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="lora")
    perturb(model)
    peftkit.merge(model)
    with pytest.raises(RuntimeError, match=r"folded into \(layers.0.q_proj.*unmerge"):
        apply_full(model, modules=["q_proj"])
    assert list(peftkit.adapters(model)) == ["lora"]
    peftkit.unmerge(model)
    apply_full(model, modules=["q_proj"])


def test_restore_follows_the_model_to_another_dtype() -> None:
    model = _model()
    with torch.no_grad():
        base = model.double()(_ids().clone())
    model.float()
    apply_full(model)
    perturb(model)
    model.double()
    with torch.no_grad(), peftkit.disable_adapters(model):
        torch.testing.assert_close(model(_ids()), base, rtol=1e-6, atol=1e-6)
    assert model.layers[0].q_proj.weight.dtype == torch.float64


def test_deepcopy_gives_the_copy_its_own_parameters() -> None:
    model = _model()
    apply_full(model, modules=["o_proj"])
    perturb(model)
    clone = copy.deepcopy(model)
    own = {id(p) for p in peftkit.adapters(clone)["default"].parameters()}
    assert own == {id(p) for n, p in clone.named_parameters() if "o_proj" in n}
    peftkit.unload(clone)
    assert not torch.equal(clone.layers[0].o_proj.weight, model.layers[0].o_proj.weight)


def test_a_failed_load_leaves_nothing_applied_even_without_the_copy(tmp_path: Path) -> None:
    model = _model()
    apply_full(model, keep_original=False)
    peftkit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    other = TinyTransformer(dim=16)
    with pytest.raises(peftkit.CheckpointError, match="shape of default.embed.weight"):
        peftkit.load_adapter(other, tmp_path)
    assert not peftkit.adapters(other)
    assert all(p.requires_grad for p in other.parameters())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_layers": 0}, "top_layers must be a positive integer"),
        ({"biases_only": "yes"}, "biases_only must be True or False"),
        ({"modules": "mlp"}, "modules must be a list"),
        ({"keep_original": None}, "keep_original must be True or False"),
    ],
)
def test_bad_config_names_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FullConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_restore_follows_the_model_to_cuda() -> None:
    model = _model()
    with torch.no_grad():
        base = model(_ids())
    apply_full(model)
    perturb(model)
    model.cuda()
    with torch.no_grad(), peftkit.disable_adapters(model):
        restored = model(_ids().cuda()).cpu()
    torch.testing.assert_close(restored, base, rtol=1e-4, atol=1e-4)
    assert model.layers[0].q_proj.weight.is_cuda and model.layers[0].q_proj.weight.requires_grad
