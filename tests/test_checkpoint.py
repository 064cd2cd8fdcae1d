"""Checkpoints: layout, atomic writes, clear errors, forward compatibility, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import CheckpointError, apply_lora, load_adapter, save_adapter
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME

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


def test_atomic_save_leaves_no_temporary_files_and_replaces_old(tmp_path: Path) -> None:
    save_adapter(_trained(seed=0), tmp_path)
    model = _trained(seed=5)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = load_adapter(_fresh(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()))


def test_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _trained(seed=0)
    save_adapter(first, tmp_path)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(peftkit.checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_trained(seed=9), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = load_adapter(_fresh(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), first(_ids()))


def test_stale_json_after_interrupted_save_warns_and_uses_the_weights_config(
    tmp_path: Path,
) -> None:
    model = _trained()
    save_adapter(model, tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(config.read_text().replace('"r": 4', '"r": 3'))
    with pytest.warns(UserWarning, match="does not match"):
        fresh = load_adapter(_fresh(), tmp_path)
    assert fresh.layers[0].q_proj.r == 4


def test_shape_mismatch_names_the_tensors_and_leaves_the_model_clean(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    other = TinyTransformer(dim=16)
    with pytest.raises(CheckpointError, match=r"shape of default\.layers\.0\.q_proj\.lora_A"):
        load_adapter(other, tmp_path)
    assert not peftkit.adapters(other)
    assert all(p.requires_grad for p in other.parameters())


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.pop("default.layers.1.v_proj.lora_B")
    tensors["default.layers.9.q_proj.lora_A"] = torch.zeros(1)
    from safetensors.torch import save_file

    meta = {"peftkit_config": (tmp_path / CONFIG_NAME).read_text()}
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata=meta)
    with pytest.raises(
        CheckpointError,
        match=r"missing default\.layers\.1\.v_proj\.lora_B.*"
        r"unexpected default\.layers\.9\.q_proj\.lora_A",
    ):
        load_adapter(_fresh(), tmp_path)


def test_truncated_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_adapter(_fresh(), tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*never unpickles"):
        load_adapter(_fresh(), tmp_path)


def test_hf_peft_directory_points_to_the_importer(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="import_peft"):
        load_adapter(_fresh(), tmp_path)


def test_newer_config_keys_warn_and_load(tmp_path: Path) -> None:
    model = _trained()
    save_adapter(model, tmp_path)
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    doc["adapters"][0]["config"]["shiny_new_option"] = True
    text = json.dumps(doc)
    (tmp_path / CONFIG_NAME).write_text(text)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"peftkit_config": text})
    with pytest.warns(UserWarning, match="shiny_new_option"):
        fresh = load_adapter(_fresh(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()))


def test_config_missing_a_required_key_is_named(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    del doc["adapters"][0]["method"]
    text = json.dumps(doc)
    (tmp_path / CONFIG_NAME).write_text(text)
    from safetensors.torch import save_file

    save_file(
        load_file(tmp_path / WEIGHTS_NAME),
        tmp_path / WEIGHTS_NAME,
        metadata={"peftkit_config": text},
    )
    with pytest.raises(CheckpointError, match=r"lacks \['method'\]"):
        load_adapter(_fresh(), tmp_path)


def test_missing_directory_and_file_path_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(_fresh(), tmp_path / "nope")
    save_adapter(_trained(), tmp_path)
    with pytest.raises(CheckpointError, match="pass the checkpoint directory"):
        load_adapter(_fresh(), tmp_path / WEIGHTS_NAME)


def test_saving_without_adapters_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapters"):
        save_adapter(TinyTransformer(), tmp_path)


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


def test_source_never_unpickles() -> None:
    src = Path(peftkit.__file__).parent
    offenders = [
        str(path)
        for path in src.rglob("*.py")
        for line in path.read_text().splitlines()
        if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line
    ]
    assert not offenders
