"""Reliability corpus, checkpoints: every damaged, foreign or mismatched checkpoint ends in a
``CheckpointError`` that says what is wrong and what to do, or in a documented recovery (a warning
and a correct load). A failed load leaves the model as it was.

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import (
    CheckpointError,
    SwapMethod,
    TargetedConfig,
    apply_lora,
    load_adapter,
    save_adapter,
)
from peftkit.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
)
from peftkit.interop import InteropError
from peftkit.methods.lora import LoraLinear

from helpers import perturb, snapshot, temporarily_registered
from zoo import CASES, TinyTransformer


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))


def _fresh(dim: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(dim=dim)


def _trained(seed: int = 0) -> nn.Module:
    model = _fresh()
    apply_lora(model, r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    perturb(model, seed=seed)
    return model


def _saved(path: Path, seed: int = 0) -> nn.Module:
    model = _trained(seed)
    save_adapter(model, path)
    return model


def _rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, **doc: Any) -> None:
    """Write a hand-edited checkpoint: changed tensors and/or config, consistent with each other
    (and, like a file from before checksums, without one)."""
    text = (path / CONFIG_NAME).read_text()
    if doc:
        text = json.dumps({**json.loads(text), **doc})
    (path / CONFIG_NAME).write_text(text)
    tensors = tensors if tensors is not None else load_file(path / WEIGHTS_NAME)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"peftkit_config": text})


def _entry(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / CONFIG_NAME).read_text())["adapters"][0])


def _refused(
    path: Path, match: str, model: nn.Module | None = None, error: type = CheckpointError
) -> None:
    model = model if model is not None else _fresh()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, path)
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert all(p.requires_grad for p in model.parameters())


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids())


# -- the checkpoint does not fit the model -------------------------------------------------------
def test_wrong_model_shape_mismatch_names_the_tensors(tmp_path: Path) -> None:
    _saved(tmp_path)
    _refused(
        tmp_path,
        r"shape of default\.layers\.0\.q_proj\.lora_A: checkpoint \(4, 32\), model \(4, 16\).*"
        "saved from another model",
        model=_fresh(dim=16),
    )


def test_wrong_architecture_names_the_missing_modules(tmp_path: Path) -> None:
    _saved(tmp_path)
    _refused(tmp_path, "target 'q_proj' matched no module", model=CASES["gpt2"].build())


def test_missing_keys_are_named(tmp_path: Path) -> None:
    _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["default.layers.1.v_proj.lora_B"]
    _rewrite(tmp_path, tensors)
    _refused(tmp_path, r"missing default\.layers\.1\.v_proj\.lora_B")


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["default.layers.9.q_proj.lora_A"] = torch.zeros(1)
    _rewrite(tmp_path, tensors)
    _refused(tmp_path, r"unexpected default\.layers\.9\.q_proj\.lora_A")


def test_tensors_of_an_adapter_the_config_does_not_list_are_unexpected(tmp_path: Path) -> None:
    """Regression: these used to be dropped silently."""
    _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["ghost.layers.0.q_proj.lora_A"] = torch.zeros(4, 32)
    _rewrite(tmp_path, tensors)
    _refused(tmp_path, r"unexpected ghost\.layers\.0\.q_proj\.lora_A")


def test_loading_a_name_the_model_already_has_is_refused_and_keeps_the_first(
    tmp_path: Path,
) -> None:
    _saved(tmp_path)
    model = _trained(seed=7)
    expected = _outputs(model)
    with pytest.raises(CheckpointError, match=r"'default' already exists.*delete_adapter"):
        load_adapter(model, tmp_path)
    assert list(peftkit.adapters(model)) == ["default"]
    torch.testing.assert_close(_outputs(model), expected, rtol=0, atol=0)


# -- damaged files ---------------------------------------------------------------------------------
def _damage_truncated(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:100])


def _damage_empty(weights: Path) -> None:
    weights.write_bytes(b"")


def _damage_header(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    weights.write_bytes(bytes(data))


def _damage_tensor_bytes(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))


def _damage_stored_config(weights: Path) -> None:
    data = weights.read_bytes()
    # Same length, valid JSON, different meaning: only the checksum can tell.
    weights.write_bytes(data.replace(b'\\"alpha\\": 16.0', b'\\"alpha\\": 96.0', 1))


DAMAGE = {
    "truncated": (_damage_truncated, "truncated or corrupt"),
    "empty-file": (_damage_empty, "truncated or corrupt"),
    "corrupt-header": (_damage_header, "truncated or corrupt"),
    "flipped-tensor-bit": (_damage_tensor_bytes, "corrupt: its contents do not match the checksum"),
    "edited-stored-config": (_damage_stored_config, "corrupt: its contents do not match"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_weights_file_is_an_error_never_wrong_weights(case: str, tmp_path: Path) -> None:
    _saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    original = weights.read_bytes()
    damage, message = DAMAGE[case]
    damage(weights)
    assert weights.read_bytes() != original
    _refused(tmp_path, f"{message}.*(re-save it, or load an earlier checkpoint)")


def test_corrupt_config_json_recovers_from_the_copy_in_the_weights(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"format": "peftkit", "adapt')
    with pytest.warns(UserWarning, match="does not match the config stored"):
        fresh = load_adapter(_fresh(), tmp_path)
    torch.testing.assert_close(_outputs(fresh), _outputs(model), rtol=0, atol=0)


def test_missing_config_json_recovers_from_the_copy_in_the_weights(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.warns(UserWarning, match="peftkit_config.json is missing; using the config stored"):
        fresh = load_adapter(_fresh(), tmp_path)
    torch.testing.assert_close(_outputs(fresh), _outputs(model), rtol=0, atol=0)


def test_stale_config_after_an_interrupted_save_uses_the_weights_config(tmp_path: Path) -> None:
    _saved(tmp_path)
    config = tmp_path / CONFIG_NAME
    config.write_text(config.read_text().replace('"r": 4', '"r": 3'))
    with pytest.warns(UserWarning, match="does not match.*interrupted save"):
        fresh = load_adapter(_fresh(), tmp_path)
    assert fresh.layers[0].q_proj.r == 4


def test_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _saved(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(peftkit.checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_trained(seed=9), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    torch.testing.assert_close(_outputs(load_adapter(_fresh(), tmp_path)), _outputs(first))


def test_leftover_temporary_files_of_a_killed_save_are_ignored(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    (tmp_path / f".{WEIGHTS_NAME}.0123abcd.tmp").write_bytes(b"half a file")
    (tmp_path / f".{CONFIG_NAME}.4567ef01.tmp").write_text("{")
    torch.testing.assert_close(_outputs(load_adapter(_fresh(), tmp_path)), _outputs(model))


# -- configs written by other versions or by hand -------------------------------------------------
def test_newer_version_config_keys_warn_and_load(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    entry = _entry(tmp_path)
    entry["config"]["shiny_new_option"] = True
    _rewrite(tmp_path, adapters=[entry])
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['shiny_new_option'\]"):
        fresh = load_adapter(_fresh(), tmp_path)
    torch.testing.assert_close(_outputs(fresh), _outputs(model), rtol=0, atol=0)


def test_newer_format_version_warns_and_loads(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    _rewrite(tmp_path, format_version=99)
    with pytest.warns(UserWarning, match="uses checkpoint format 99"):
        fresh = load_adapter(_fresh(), tmp_path)
    torch.testing.assert_close(_outputs(fresh), _outputs(model), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["name", "method", "config"])
def test_adapter_entry_missing_a_required_key_is_named(key: str, tmp_path: Path) -> None:
    _saved(tmp_path)
    entry = _entry(tmp_path)
    del entry[key]
    _rewrite(tmp_path, adapters=[entry])
    _refused(tmp_path, rf"lacks \['{key}'\]; each entry needs name, method and config")


@dataclass(frozen=True, kw_only=True)
class WidthConfig(TargetedConfig):
    width: int  # required: no default


class Width(SwapMethod):
    def wrap(self, module: nn.Module, path: str) -> Any:
        return LoraLinear(
            module, self.adapter_name, path, r=self.config.width, scaling=1.0, dropout=0
        )


def test_method_config_missing_a_required_field_is_named(tmp_path: Path) -> None:
    with temporarily_registered("reliability-width", WidthConfig, Width):
        model = _fresh()
        peftkit.apply(model, WidthConfig(targets=["q_proj"], width=2))
        save_adapter(model, tmp_path)
        entry = _entry(tmp_path)
        del entry["config"]["width"]
        _rewrite(tmp_path, adapters=[entry])
        _refused(tmp_path, r"lacks required keys \['width'\].*re-save the adapter")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"dropout": 2}, r"dropout must be in \[0, 1\)"),
        ({"targets": 5}, "targets must be a list of module names"),
    ],
    ids=["rank-zero", "dropout-two", "targets-not-a-list"],
)
def test_invalid_value_in_a_saved_config_is_named(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    _saved(tmp_path)
    entry = _entry(tmp_path)
    entry["config"].update(changes)
    _rewrite(tmp_path, adapters=[entry])
    _refused(tmp_path, message)


def test_method_that_is_not_installed_says_to_import_it(tmp_path: Path) -> None:
    _saved(tmp_path)
    entry = _entry(tmp_path)
    entry["method"] = "not-installed"
    _rewrite(tmp_path, adapters=[entry])
    _refused(tmp_path, r"no method named 'not-installed'.*must be imported", error=KeyError)


def test_foreign_json_is_not_taken_for_a_config(tmp_path: Path) -> None:
    _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"hello": "world"}))
    save_file(load_file(tmp_path / WEIGHTS_NAME), tmp_path / WEIGHTS_NAME)  # no stored copy
    _refused(tmp_path, "is not a peftkit adapter config")


def test_hf_peft_directory_is_imported_through_the_importers_checks(tmp_path: Path) -> None:
    (tmp_path / LEGACY_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, tmp_path / LEGACY_WEIGHTS_NAME)
    _refused(tmp_path, r"tensor 'x' does not start with 'base_model\.model\.'", error=InteropError)


def test_pickle_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _refused(tmp_path, "is a pickle file; peftkit never unpickles.*Convert it to safetensors")


# -- paths -------------------------------------------------------------------------------------
def test_missing_directory_file_path_and_empty_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", "does not exist")
    _refused(tmp_path, f"holds no {WEIGHTS_NAME}")
    _saved(tmp_path)
    _refused(tmp_path / WEIGHTS_NAME, "is a file; pass the checkpoint directory")


def test_saving_into_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file; pass a directory"):
        save_adapter(_trained(), target)
    assert target.read_text() == "keep me"
