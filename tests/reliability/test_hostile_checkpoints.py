"""Reliability corpus, hostile and mistyped checkpoint files: every field is type-checked, never
coerced; a small file cannot make loading hang or allocate what its tensors do not hold; a run
directory, a peft directory beside a peftkit one, and names given as one string all end in a
clear error or a correct load. A refused load leaves the model as it was.

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import peftkit
from peftkit import CheckpointError, apply_adalora, apply_lora, load_adapter, save_adapter
from peftkit.checkpoint import CONFIG_NAME, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from peftkit.interop import InteropError, export_peft, import_peft

from helpers import perturb, snapshot
from zoo import TinyTransformer

Edit = Callable[[dict[str, Any]], None]


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


def _saved(path: Path, adalora: bool = False) -> nn.Module:
    model = _fresh()
    if adalora:
        apply_adalora(model, total_steps=10, targets=["q_proj"])
    else:
        apply_lora(model, r=4, targets=["q_proj", "v_proj"])
    perturb(model)
    save_adapter(model, path)
    return model


def _edit(path: Path, edit: Edit) -> None:
    """Hand-edit the config (both copies, as a file from before checksums would be)."""
    doc = json.loads((path / CONFIG_NAME).read_text())
    edit(doc)
    _write_config(path, json.dumps(doc))


def _write_config(path: Path, text: str) -> None:
    (path / CONFIG_NAME).write_text(text)
    tensors = load_file(path / WEIGHTS_NAME)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"peftkit_config": text})


def _entry(key: str, value: Any) -> Edit:
    return lambda doc: doc["adapters"][0].__setitem__(key, value)


def _config(key: str, value: Any) -> Edit:
    return lambda doc: doc["adapters"][0]["config"].__setitem__(key, value)


def _refused(
    path: Path,
    match: str,
    load: Callable[[nn.Module], Any] | None = None,
    error: type[Exception] | tuple[type[Exception], ...] = (CheckpointError, InteropError),
) -> None:
    model = _fresh()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        (load or (lambda m: load_adapter(m, path)))(model)
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert all(p.requires_grad for p in model.parameters())


RESAVE = "fix the file, or re-save the adapter with peftkit.save_adapter"
# (edit of the saved document, AdaLoRA adapter?, message)
EDITED: dict[str, tuple[Edit, bool, str]] = {
    "active-a-string": (
        _entry("active", "false"),
        False,
        r"'active' of adapter 'default' must be true or false, got 'false' \(str\); " + RESAVE,
    ),
    "active-a-number": (_entry("active", 0), False, r"'active'.*must be true or false, got 0"),
    "format-version-a-string": (
        lambda doc: doc.__setitem__("format_version", "2"),
        False,
        "format_version must be an integer such as 2, got '2'",
    ),
    "format-version-a-bool": (
        lambda doc: doc.__setitem__("format_version", True),
        False,
        "format_version must be an integer such as 2, got True",
    ),
    "config-a-list": (
        _entry("config", []),
        False,
        r"'config' of adapter 'default' must be an object, got \[\] \(list\)",
    ),
    "method-a-number": (
        _entry("method", 5),
        False,
        "'method' of adapter 'default' must be a string",
    ),
    "name-with-a-newline": (
        _entry("name", "default\n"),
        False,
        r"adapter name 'default\\n' must be a string of letters, digits, '_' or '-'",
    ),
    "name-a-number": (_entry("name", 7), False, "adapter name 7 must be a string of letters"),
    "entry-not-an-object": (
        lambda doc: doc.__setitem__("adapters", ["lora"]),
        False,
        "an adapter entry must be a JSON object with name, method and config, got 'lora'",
    ),
    "adapters-an-object": (
        lambda doc: doc.__setitem__("adapters", {"default": {}}),
        False,
        "lists no adapters",
    ),
    "duplicate-adapter-names": (
        lambda doc: doc["adapters"].append(dict(doc["adapters"][0])),
        False,
        r"lists adapter \['default'\] more than once",
    ),
    "adalora-state-garbage": (
        _entry("state", "garbage"),
        True,
        r"'state' of adapter 'default' must be an object, got 'garbage' \(str\)",
    ),
    "adalora-rank-pattern-garbage": (
        _entry("state", {"rank_pattern": "garbage", "masked": False, "final": False}),
        True,
        r"AdaLoRA adapter 'default': its saved state must hold rank_pattern \(module paths to "
        r"ranks from 0 to init_r=12\)",
    ),
    "adalora-rank-above-init-r": (
        _entry("state", {"rank_pattern": {"layers.0.q_proj": 10**9}}),
        True,
        "ranks from 0 to init_r=12",
    ),
    "adalora-masked-a-string": (
        _entry("state", {"rank_pattern": {}, "masked": "yes"}),
        True,
        r"masked and final \(true or false\)",
    ),
    "rank-a-string": (_config("r", "4"), False, "r must be a positive integer, got '4'"),
    "dropout-false": (_config("dropout", False), False, r"dropout must be in \[0, 1\), got False"),
    "train-head-a-string": (
        _config("train_head", "false"),
        False,
        r"train_head must be None \(auto\), True or False, got 'false'",
    ),
    "rank-pattern-a-string": (
        _config("rank_pattern", "abc"),
        False,
        "rank_pattern must map module patterns to values",
    ),
    "exclude-typo": (
        _config("exclude", ["q_prj"]),
        False,
        "exclude 'q_prj' matched no module; closest names: q_proj",
    ),
    "targets-catastrophic-regex": (
        _config("targets", ["re:(.*)*Z"]),
        False,
        "can take exponential time to match",
    ),
    "targets-and-modules-to-save": (
        _config("modules_to_save", ["q_proj"]),
        False,
        "'layers.0.q_proj' is selected by both targets and modules_to_save",
    ),
    "rank-larger-than-the-tensors": (
        _config("r", 200_000_000),
        False,
        r"shape of default\.layers\.0\.q_proj\.lora_A: checkpoint \(4, 32\), model "
        r"\(200000000, 32\)",
    ),
    "targets-beyond-the-tensors": (
        _config("targets", ["q_proj", "v_proj", "k_proj"]),
        False,
        r"missing default\.layers\.0\.k_proj\.lora_A",
    ),
}


@pytest.mark.parametrize("case", list(EDITED))
def test_edited_checkpoint_field_is_refused_naming_it(case: str, tmp_path: Path) -> None:
    edit, adalora, message = EDITED[case]
    _saved(tmp_path, adalora)
    _edit(tmp_path, edit)
    _refused(tmp_path, message)


def test_deeply_nested_json_is_refused_without_recursion_error(tmp_path: Path) -> None:
    _saved(tmp_path)
    _write_config(tmp_path, "[" * 200_000 + "]" * 200_000)
    _refused(tmp_path, "nests its JSON too deeply to read")


def test_deeply_nested_peft_config_is_refused(tmp_path: Path) -> None:
    model = _saved(tmp_path / "peftkit")
    export_peft(model, tmp_path / "peft")
    (tmp_path / "peft" / LEGACY_CONFIG_NAME).write_text('{"peft_type": ' + "[" * 200_000)
    _refused(tmp_path / "peft", "nests its JSON too deeply")
    _refused(
        tmp_path / "peft", "nests its JSON too deeply", lambda m: import_peft(m, tmp_path / "peft")
    )


def test_hostile_regex_fails_fast(tmp_path: Path) -> None:
    _saved(tmp_path)
    _edit(tmp_path, _config("targets", ["re:(.|.)*Z"]))
    start = time.monotonic()
    _refused(tmp_path, "can take exponential time to match")
    assert time.monotonic() - start < 5  # the match alone would take hours on these names


class _Largest(TorchDispatchMode):
    """The most elements any real (non-meta) tensor made under this mode holds."""

    largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def test_a_huge_rank_in_a_small_file_allocates_nothing(tmp_path: Path) -> None:
    _saved(tmp_path)
    _edit(tmp_path, _config("r", 2_000_000))  # 64M elements per factor, were it built
    model = _fresh()
    with _Largest() as watch, pytest.raises(CheckpointError, match=r"model \(2000000, 32\)"):
        load_adapter(model, tmp_path)
    assert watch.largest < 10_000


def test_a_load_allocates_only_the_adapters_it_builds(tmp_path: Path) -> None:
    original = _saved(tmp_path)
    model = _fresh()
    with _Largest() as watch:
        load_adapter(model, tmp_path)
    assert watch.largest <= 32 * 50  # the largest base weight: the dry run copies none
    ids = torch.randint(50, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))


# -- directories ------------------------------------------------------------------------------------
def test_a_run_directory_lists_its_checkpoints(tmp_path: Path) -> None:
    for name in ("checkpoint-10", "checkpoint-2", "best"):
        _saved(tmp_path / name)
    (tmp_path / "log.jsonl").write_text("{}\n")
    _refused(
        tmp_path,
        rf"{tmp_path} holds no {WEIGHTS_NAME} but holds checkpoints: checkpoint-2, checkpoint-10, "
        rf"best\. It looks like a training run's output_dir; pass one of them, e\.g\. "
        rf"'{tmp_path}/best'",
    )


def test_save_then_export_into_one_directory_keeps_both(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    export_peft(model, tmp_path)
    ids = torch.randint(50, (2, 6))
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(load_adapter(_fresh(), tmp_path)(ids), want)
        assert torch.allclose(import_peft(_fresh(), tmp_path)(ids), want, atol=1e-6)


def test_export_over_a_format_1_checkpoint_is_refused(tmp_path: Path) -> None:
    model = _saved(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    doc = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())
    (old / LEGACY_CONFIG_NAME).write_text(json.dumps({**doc, "format_version": 1}))
    save_file(load_file(tmp_path / "new" / WEIGHTS_NAME), old / LEGACY_WEIGHTS_NAME)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(
        InteropError, match="holds a peftkit checkpoint in format 1.*would overwrite"
    ):
        export_peft(model, old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_export_then_save_leaves_the_peft_files(tmp_path: Path) -> None:
    model = _saved(tmp_path / "a")
    export_peft(model, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    save_adapter(model, tmp_path / "b")
    after = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {CONFIG_NAME, WEIGHTS_NAME}


def test_one_adapter_name_as_a_string_loads_that_adapter(tmp_path: Path) -> None:
    _saved(tmp_path)
    model = load_adapter(_fresh(), tmp_path, "default")
    assert list(peftkit.adapters(model)) == ["default"]


def test_an_unknown_name_among_several_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    _refused(
        tmp_path,
        r"no adapter \['nope'\] in \['default'\]",
        lambda m: load_adapter(m, tmp_path, ["default", "nope"]),
    )


def test_loading_into_a_wrapped_model_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    _refused(
        tmp_path,
        "wrapped in DataParallel; apply or load adapters before wrapping it",
        lambda m: load_adapter(nn.DataParallel(m), tmp_path),
        TypeError,
    )
