"""Checkpoints: layout, round trips, atomic replacement.

Damaged, foreign and mismatched checkpoints are the reliability corpus: tests/reliability/.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import peftkit
from peftkit import CheckpointError, apply_lora, load_adapter, save_adapter
from peftkit.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    checkpoint_layout,
    content_digest,
)

from helpers import perturb
from zoo import CASES, TinyTransformer


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))


def _trained(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    perturb(model, seed=seed)
    return model


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


def test_layout_holds_only_adapter_tensors(tmp_path: Path) -> None:
    model = _trained()
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {
        f"default.layers.{i}.{m}.lora_{f}"
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
        for f in "AB"
    }
    assert tensors["default.layers.0.v_proj.lora_A"].shape == (2, 32)
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert doc["format"] == "peftkit" and doc["adapters"][0]["method"] == "lora"
    assert doc["adapters"][0]["config"]["rank_pattern"] == {"v_proj": 2}
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        meta = f.metadata()
    assert meta["peftkit_config"] == (tmp_path / CONFIG_NAME).read_text()
    assert meta["peftkit_sha256"] == content_digest(tensors, meta["peftkit_config"])


def test_round_trip_of_several_adapters_with_active_state(tmp_path: Path) -> None:
    model = _trained()
    apply_lora(model, r=2, targets=["up"], adapter_name="extra")
    perturb(model, seed=3)
    peftkit.set_active(model, "default")
    with torch.no_grad():
        expected = model(_ids())
    save_adapter(model, tmp_path)
    fresh = load_adapter(_fresh(), tmp_path)
    assert peftkit.active_adapters(fresh) == ["default"]
    assert list(peftkit.adapters(fresh)) == ["default", "extra"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), expected, rtol=0, atol=0)


def test_load_selected_adapters_only(tmp_path: Path) -> None:
    model = _trained()
    apply_lora(model, r=2, targets=["up"], adapter_name="extra")
    save_adapter(model, tmp_path)
    fresh = load_adapter(_fresh(), tmp_path, ["extra"])
    assert list(peftkit.adapters(fresh)) == ["extra"]
    with pytest.raises(CheckpointError, match="no adapter"):
        load_adapter(_fresh(), tmp_path, ["nope"])


def test_saving_named_adapters_keeps_the_order_they_compute_in(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply_adapter(model, targets=["down"], adapter_name="a")
    peftkit.apply_adapter(model, targets=["down"], adapter_name="b")  # stacked: order matters
    perturb(model, seed=4, scale=0.5)
    with torch.no_grad():
        expected = model(_ids())
    save_adapter(model, tmp_path, ["b", "a", "b"])
    fresh = load_adapter(_fresh(), tmp_path)
    assert list(peftkit.adapters(fresh)) == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), expected, rtol=0, atol=0)


def test_atomic_save_leaves_no_temporary_files_and_replaces_old(tmp_path: Path) -> None:
    save_adapter(_trained(seed=0), tmp_path)
    model = _trained(seed=5)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = load_adapter(_fresh(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()))


def test_saved_module_round_trips(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    apply_lora(model, r=2, targets=["query"], modules_to_save=["classifier"])
    perturb(model)
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert {"default.classifier.trained.weight", "default.classifier.trained.bias"} <= keys
    fresh = load_adapter(case.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), case.output(model), rtol=0, atol=0)


# -- format 1 (peftkit 0.1: peft's file names) -----------------------------------------------------
FORMAT_1 = Path(__file__).parent / "data" / "format-1"  # written by the format-1 save_adapter


def _format_1_copy(tmp_path: Path) -> Path:
    out = tmp_path / "old"
    shutil.copytree(FORMAT_1, out)
    (out / "expected.safetensors").unlink()
    return out


def test_a_format_1_checkpoint_loads(tmp_path: Path) -> None:
    path = _format_1_copy(tmp_path)
    assert json.loads((path / LEGACY_CONFIG_NAME).read_text())["format_version"] == 1
    expected = load_file(FORMAT_1 / "expected.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an old checkpoint is not a damaged one
        model = load_adapter(_fresh(), path)
    assert {n: m.active for n, m in peftkit.adapters(model).items()} == {"a": True, "b": False}
    stored = load_file(path / LEGACY_WEIGHTS_NAME)
    assert all(torch.equal(t, stored[k]) for k, t in peftkit.adapter_state_dict(model).items())
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]), expected["logits"])


def test_a_format_1_checkpoint_without_its_json_recovers_from_the_weights(tmp_path: Path) -> None:
    path = _format_1_copy(tmp_path)
    (path / LEGACY_CONFIG_NAME).unlink()
    with pytest.warns(UserWarning, match="adapter_config.json is missing; using the config stored"):
        model = load_adapter(_fresh(), path)
    assert list(peftkit.adapters(model)) == ["a", "b"]


def test_saving_over_a_format_1_checkpoint_replaces_it(tmp_path: Path) -> None:
    path = _format_1_copy(tmp_path)
    model = load_adapter(_fresh(), path)
    save_adapter(model, path)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert json.loads((path / CONFIG_NAME).read_text())["format_version"] == 2
    fresh = load_adapter(_fresh(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=0, atol=0)


def test_the_file_names_are_peftkits_own(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    assert CONFIG_NAME == "peftkit_config.json" and WEIGHTS_NAME == "peftkit_model.safetensors"
    assert not (tmp_path / LEGACY_CONFIG_NAME).exists()
    assert checkpoint_layout(tmp_path) == "peftkit"
    assert checkpoint_layout(FORMAT_1) == "peftkit-1"
    assert checkpoint_layout(tmp_path / "nothing") is None
    # A run directory of old peftkit checkpoints is not a directory of peft adapters.
    shutil.copytree(FORMAT_1, tmp_path / "runs" / "checkpoint-1")
    assert checkpoint_layout(tmp_path / "runs") is None


def test_a_prefix_over_lora_loads_although_its_probe_cannot_run_on_the_shape_only_copy(
    tmp_path: Path,
) -> None:
    """Loading first builds the adapters on a meta-device copy to check their shapes; prefix-tuning
    runs the model there to read its cache layout, through the LoRA layers (whose autocast check
    must accept meta tensors) or through kernels without meta support (then the check runs after
    building on the real model)."""
    from peftkit.layers import autocast_on

    assert autocast_on(torch.empty(2, device="meta")) is False
    model = CASES["llama"].build()
    apply_lora(model, r=2, targets=["q_proj"], adapter_name="lora")
    peftkit.apply_prefix(model, prefix_length=3, adapter_name="prefix")
    perturb(model)
    batch = CASES["llama"].inputs()
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    save_adapter(model, tmp_path)
    fresh = load_adapter(CASES["llama"].build(), tmp_path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)
