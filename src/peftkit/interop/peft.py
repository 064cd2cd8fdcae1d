"""Read and write the HF ``peft`` checkpoint format.

A peft adapter directory holds ``adapter_config.json`` (a flat dict with ``peft_type``) and
``adapter_model.safetensors`` (tensors keyed by peft's own module names). ``export_peft`` and
``import_peft`` do the file work, the checks and the roll-back; what a method's tensors and config
look like in peft's format is the job of a *converter*, one per method, registered by name::

    @register_peft_converter
    class LoraConverter(PeftConverter):
        method = "lora"          # peftkit registry name
        peft_type = "LORA"       # peft's name
        def to_peft(self, model, method): ...      # -> PeftAdapter
        def from_peft(self, model, adapter): ...   # -> Converted

Writing needs no ``peft`` install; only safetensors and JSON are ever read (nothing is unpickled).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from .. import _sharding
from .._document import parse_json
from ..checkpoint import (
    CheckpointError,
    _atomic_write,
    _read_weights,
    _to_saveable,
    checkpoint_layout,
    register_peft_importer,
)
from ..config import MethodConfig
from ..core import adapters, attach, delete_adapter, load_adapter_state_dict, unwrap_model
from ..layers import AdapterLayer
from ..methods.base import Method
from ..registry import spec_for_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)


class InteropError(CheckpointError):
    """An adapter cannot be converted between peftkit and HF peft; the message names what and why."""


@dataclass
class PeftAdapter:
    """One adapter in peft's terms: its config dict and its tensors under peft's key names."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class Converted:
    """One adapter in peftkit's terms, ready to attach.

    tensors are keyed ``<module path>.<local name>`` as ``Method.state_dict`` gives them; state is
    what ``Method.load_extra_state`` takes (e.g. live ranks), empty for most methods.
    """

    config: MethodConfig
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)


class PeftConverter:
    """Translates one peftkit method to and from peft's format. Subclass, set both names, register."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    # True where peft only applies the adapter through a task-specific PeftModel (prompt methods).
    needs_task_type: ClassVar[bool] = False

    def to_peft(self, model: nn.Module, method: Method) -> PeftAdapter:
        """peft's config fields (without ``peft_type``/``task_type``) and tensors for ``method``."""
        raise NotImplementedError

    def from_peft(self, model: nn.Module, adapter: PeftAdapter) -> Converted:
        """The peftkit config and tensors for a peft adapter on ``model`` (not yet applied)."""
        raise NotImplementedError


_BY_METHOD: dict[str, PeftConverter] = {}
_BY_PEFT_TYPE: dict[str, PeftConverter] = {}
T = TypeVar("T", bound=type[PeftConverter])


def register_peft_converter(cls: T) -> T:
    """Class decorator: make ``cls`` the converter for its ``method`` and ``peft_type``."""
    if not cls.method or not cls.peft_type:
        raise ValueError(f"{cls.__name__} must set both `method` and `peft_type`")
    converter = cls()
    _BY_METHOD[cls.method] = converter
    _BY_PEFT_TYPE[cls.peft_type] = converter
    return cls


def converters() -> dict[str, str]:
    """peftkit method name -> peft type, for every registered converter."""
    return {name: c.peft_type for name, c in _BY_METHOD.items()}


# -- export ------------------------------------------------------------------------------------
def export_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` as a peft adapter directory; returns the directory.

    ``peft.PeftModel.from_pretrained(base, directory)`` then computes what the peftkit model computes
    with only this adapter active. ``task_type`` (e.g. ``"CAUSAL_LM"``) picks the PeftModel subclass
    peft builds; None gives the plain ``PeftModel``. Raises ``InteropError`` naming anything peft
    cannot represent. Both files are written atomically.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {list(TASK_TYPES)}, got {task_type!r}")
    _sharding.refuse_sharded(model, "export_peft")
    methods = adapters(model)
    if adapter_name not in methods:
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {list(methods)}")
    method = methods[adapter_name]
    converter = _converter_for_method(method.name)
    if converter.needs_task_type and task_type is None:
        raise InteropError(
            f"peft applies a {converter.peft_type} adapter only through a task-specific model; "
            'pass task_type (e.g. "CAUSAL_LM" for GPT-2 / Llama, "SEQ_CLS" for classification)'
        )
    inner = unwrap_model(model)
    method.before_save(inner)
    adapter = converter.to_peft(inner, method)
    name_or_path = base_model_name_or_path or getattr(inner, "name_or_path", None) or None
    config = {
        "peft_type": converter.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        **adapter.config,
    }
    return _write(Path(directory), PeftAdapter(config, adapter.tensors))


def _write(out: Path, adapter: PeftAdapter) -> Path:
    tensors = {k: _to_saveable(t) for k, t in adapter.tensors.items()}
    text = json.dumps(adapter.config, indent=2, sort_keys=True) + "\n"
    if out.is_file():
        raise InteropError(f"{out} is a file; pass a directory to write the adapter into")
    if checkpoint_layout(out) == "peftkit-1":
        raise InteropError(
            f"{out} holds a peftkit checkpoint in format 1, under the file names peft uses; "
            "exporting there would overwrite it. Export into another directory, or re-save the "
            "checkpoint with peftkit.save_adapter first (which writes peftkit's own file names)"
        )
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return out


def _converter_for_method(name: str) -> PeftConverter:
    if name not in _BY_METHOD:
        raise InteropError(
            f"peft export supports methods {sorted(_BY_METHOD)}; the adapter uses {name!r}, which "
            "has no peft converter (save it with peftkit.save_adapter instead)"
        )
    return _BY_METHOD[name]


# -- import ------------------------------------------------------------------------------------
def import_peft(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = "default"
) -> nn.Module:
    """Apply the adapter in peft directory ``directory`` to ``model`` as ``adapter_name``; returns it.

    ``model`` is the base the adapter was trained on. The result computes what peft's model computes.
    Anything peftkit cannot represent (DoRA, trained biases, another peft type, ...) raises an
    ``InteropError`` that names it; on any error nothing is left applied.
    """
    path = Path(directory)
    adapter = read_peft_directory(path)
    peft_type = adapter.config.get("peft_type")
    if peft_type not in _BY_PEFT_TYPE:
        supported = sorted(_BY_PEFT_TYPE)
        raise InteropError(
            f"{path}: peft_type {peft_type!r} is not supported; peftkit imports {supported}"
        )
    inner = unwrap_model(model)
    try:
        converted = _BY_PEFT_TYPE[peft_type].from_peft(inner, adapter)
    except InteropError as err:
        raise InteropError(f"{path}: {err}") from err
    _attach_converted(inner, converted, adapter_name, path)
    return model


def _attach_converted(
    model: nn.Module, converted: Converted, adapter_name: str, path: Path
) -> None:
    # What the peft file holds is what is applied: no task head besides its modules_to_save.
    config = replace(converted.config, train_head=False)
    method = spec_for_config(config).method_cls(config, adapter_name)
    method.load_extra_state(converted.state)
    attach(model, method)
    try:
        tensors = {f"{adapter_name}.{k}": v for k, v in converted.tensors.items()}
        load_adapter_state_dict(model, tensors, [adapter_name])
    except ValueError as err:
        delete_adapter(model, adapter_name)
        raise InteropError(f"{path}: {err}") from err
    except BaseException:
        delete_adapter(model, adapter_name)
        raise


def read_peft_directory(path: Path) -> PeftAdapter:
    """The config and tensors of a peft adapter directory (safetensors only; pickle is refused)."""
    _check_peft_directory(path)
    config = parse_json((path / CONFIG_NAME).read_text(encoding="utf-8"), path / CONFIG_NAME)
    if not isinstance(config, dict) or "peft_type" not in config:
        hint = (
            "it is a peftkit checkpoint; load it with peftkit.load_adapter(model, dir)"
            if isinstance(config, dict) and config.get("format") == "peftkit"
            else "it has no peft_type"
        )
        raise CheckpointError(f"{path / CONFIG_NAME} is not a peft adapter config: {hint}")
    tensors, _ = _read_weights(path / WEIGHTS_NAME)
    return PeftAdapter(config, tensors)


def _check_peft_directory(path: Path) -> None:
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the adapter directory that holds it")
    if not path.is_dir():
        raise CheckpointError(f"adapter directory {path} does not exist")
    if (path / WEIGHTS_NAME).exists() and (path / CONFIG_NAME).exists():
        return
    if checkpoint_layout(path) == "peftkit":
        raise CheckpointError(
            f"{path} is a peftkit checkpoint, not a peft adapter; load it with "
            "peftkit.load_adapter(model, dir)"
        )
    pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
    if pickled:
        raise CheckpointError(
            f"{path / pickled[0]} is a pickle file; peftkit never unpickles (it can run code). "
            "Re-save it with peft as safetensors: "
            "PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)"
        )
    nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
    if nested:
        raise CheckpointError(
            f"{path} holds several peft adapters in subdirectories; pass one of {nested}, "
            f"e.g. {path / nested[0]}"
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).exists()]
    raise CheckpointError(f"{path} is not a peft adapter directory: no {' or '.join(missing)}")


# -- copies of base weights ----------------------------------------------------------------------
def drop_base_copies(
    tensors: dict[str, torch.Tensor], adapted: Collection[str], modules: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """``tensors`` (prefix removed) without the copies of base weights peft keeps beside adapters.

    peft stores ``<module>.base_layer.<name>`` for an adapted embedding by default (its
    ``save_embedding_layers``). Such a copy of a module in ``adapted`` is dropped when it equals the
    model's own tensor; one that differs raises ``InteropError`` (see ``check_base_copy``).
    """
    left: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path, infix, name = key.rpartition(".base_layer.")
        module = modules.get(path) if infix and path in adapted else None
        if module is None:
            left[key] = tensor
            continue
        inner = module.base_layer() if isinstance(module, AdapterLayer) else module
        own = inner.state_dict().get(name)
        if own is None:
            left[key] = tensor  # no such base tensor: left for the caller to name as stray
            continue
        check_base_copy(path, key, tensor, own)
    return left


def check_base_copy(path: str, key: str, stored: torch.Tensor, own: torch.Tensor) -> None:
    """Raise ``InteropError`` unless ``stored`` equals ``own`` bit for bit.

    Where the dtypes differ (a base saved in bfloat16, loaded in float32), equal means equal
    once one of them is rounded to the other's dtype: what a plain cast of the same weights gives.
    """
    own = own.detach().to("cpu")
    if stored.shape != own.shape:
        raise InteropError(
            f"{path}: the file holds a copy of its base weight {key} of shape "
            f"{tuple(stored.shape)}, this model's is {tuple(own.shape)} (a resized embedding?); "
            "import the adapter into the base it was saved from"
        )
    same = torch.equal(stored, own) or (
        stored.dtype != own.dtype
        and (torch.equal(own.to(stored.dtype), stored) or torch.equal(stored.to(own.dtype), own))
    )
    if not same:
        diff = (stored.double() - own.double()).abs().max().item()
        raise InteropError(
            f"{path}: the file holds a copy of its base weight {key} that differs from this "
            f"model's (max difference {diff:.3g}), so the adapter was trained on another base (or "
            "with a trained embedding); import it into the base it was saved from"
        )


# -- names -------------------------------------------------------------------------------------
Matcher = Callable[[str, str], bool]


def suffix_match(name: str, pattern: str) -> bool:
    """peft's (and peftkit's) rule for list entries: the whole name, or a suffix after a dot."""
    return name == pattern or name.endswith("." + pattern)


def exact_names(
    universe: list[str], chosen: list[str], match: Matcher = suffix_match, what: str = "targets"
) -> list[str]:
    """The shortest name list that selects exactly ``chosen`` among ``universe`` under ``match``.

    A leaf name (``"q_proj"``) is used where it selects only chosen modules, the full path
    elsewhere, so configs stay readable and selection stays exact in both libraries.
    """
    wanted = set(chosen)
    by_leaf: dict[str, list[str]] = {}
    for path in chosen:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    names: list[str] = []
    for leaf, paths in sorted(by_leaf.items()):
        if all(u in wanted for u in universe if match(u, leaf)):
            names.append(leaf)
        else:
            names.extend(sorted(set(paths)))
    selected = {u for u in universe if any(match(u, n) for n in names)}
    if selected != wanted:
        extra = sorted(selected - wanted) or sorted(wanted - selected)
        raise InteropError(f"cannot name {what} {sorted(wanted)} exactly; {extra} would differ")
    return names


def pattern_names(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Per-module values that differ from ``default``, keyed by the shortest exact name.

    ``values`` maps every adapted module path to its value. A leaf name is used when every adapted
    module with that leaf has the same (non-default) value; otherwise the full paths.
    """
    by_leaf: dict[str, list[str]] = {}
    for path in values:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    out: dict[str, Any] = {}
    for leaf, paths in sorted(by_leaf.items()):
        distinct = {values[p] for p in paths}
        if len(distinct) == 1 and values[paths[0]] != default:
            out[leaf] = values[paths[0]]
            continue
        for path in sorted(paths):
            if values[path] != default:
                out[path] = values[path]
    for path, value in values.items():
        key = next((k for k in out if suffix_match(path, k)), None)
        if (default if key is None else out[key]) != value:
            raise InteropError(f"cannot name the per-module value of {path!r} exactly")
    return out


def _import_for_load_adapter(model: nn.Module, path: Path, name: str) -> nn.Module:
    return import_peft(model, path, adapter_name=name)


register_peft_importer(_import_for_load_adapter)
