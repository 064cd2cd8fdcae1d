"""Adapter checkpoints: ``peftkit_config.json`` + ``peftkit_model.safetensors``, nothing pickled.

The file names are peftkit's own, so no tool that reads HF peft's ``adapter_config.json`` mistakes a
peftkit checkpoint for a peft adapter, and ``interop.export_peft`` can write peft's files into the
same directory. Format 1 (peftkit 0.1) used peft's file names; it is still read, never
written, and a save over it removes it. A directory peft saved is imported through ``interop``.

Both files are written atomically (temporary file, fsync, rename). The weights file also carries the
config text in its safetensors metadata, so it is self-describing: if a save was interrupted between
the two renames, loading notices the stale JSON, warns, and uses the config that matches the weights.
It also carries a SHA-256 of that config text and every tensor's bytes (safetensors itself has no
checksum), so a flipped bit anywhere in the data is an error on load, never silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import _sharding
from ._document import CheckpointError as CheckpointError
from ._document import check_document, parse_json
from ._dryrun import planned_shapes
from ._guards import check_tensors_fit, name_list
from ._version import __version__
from .core import (
    adapter_name_list,
    adapter_state_dict,
    adapters,
    attach,
    detach,
    load_adapter_state_dict,
)
from .registry import spec

CONFIG_NAME = "peftkit_config.json"
WEIGHTS_NAME = "peftkit_model.safetensors"
# Format 1 used the file names of HF peft, which peft then took for its own and failed on.
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "peftkit"
FORMAT_VERSION = 2
_META_KEY = "peftkit_config"
_DIGEST_KEY = "peftkit_sha256"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")


Layout = Literal["peftkit", "peftkit-1", "peft"]


def checkpoint_layout(directory: str | os.PathLike[str]) -> Layout | None:
    """What ``directory`` holds: a peftkit checkpoint, one in format 1, an HF peft adapter, or None.

    peftkit's own file names win where a directory holds both (``export_peft`` beside
    ``save_adapter``). Only file names and JSON are read, never tensors.
    """
    path = Path(directory)
    if (path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists():
        return "peftkit"
    legacy = path / LEGACY_CONFIG_NAME
    if legacy.is_file():
        return "peft" if "peft_type" in _json_doc(legacy) else "peftkit-1"
    if (path / LEGACY_WEIGHTS_NAME).exists():
        return "peftkit-1"  # its config may be lost; the copy inside the weights says more
    if path.is_dir() and any(
        "peft_type" in _json_doc(p) for p in path.glob(f"*/{LEGACY_CONFIG_NAME}")
    ):
        return "peft"  # several peft adapters, one per subdirectory
    return None


def _json_doc(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_names: str | Sequence[str] | None = None,
) -> Path:
    """Write the model's adapters (or the named ones) to ``directory``; returns the directory.

    Only adapter parameters and saved modules are stored, never base weights. Adapters are stored
    in the order they were applied (which ``load_adapter`` restores), whatever the order of
    ``adapter_names``: stacked adapters compute in that order. On a model sharded with FSDP2 every
    process must call it: the shards are gathered to full tensors and the first process writes
    them (the others wait until the files exist).
    """
    text, tensors, sharded = adapter_files(model, adapter_names)
    out = Path(directory)
    if sharded and not _sharding.writes():
        _sharding.barrier()
        return out
    write_adapter_files(out, text, tensors)
    if sharded:
        _sharding.barrier()
    return out


def adapter_files(
    model: nn.Module, adapter_names: str | Sequence[str] | None = None
) -> tuple[str, dict[str, torch.Tensor], bool]:
    """The adapter config text, its full CPU tensors, and whether they were gathered from FSDP2
    shards (then every process must call this, with the same names)."""
    methods = adapters(model)
    if not methods:
        raise ValueError("the model has no adapters to save; apply one first")
    wanted = adapter_name_list(model, adapter_names)
    names = [n for n in methods if n in wanted]
    for name in names:
        methods[name].before_save(model)
    entries = [
        {
            "name": name,
            "method": methods[name].name,
            "active": methods[name].active,
            "config": methods[name].config.to_dict(),
            "state": methods[name].extra_state(),
        }
        for name in names
    ]
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "peftkit_version": __version__}
    text = json.dumps({**doc, "adapters": entries}, indent=2) + "\n"
    live = adapter_state_dict(model, names)
    full = _sharding.full_tensors(live)
    tensors = {k: _to_saveable(t) for k, t in full.items()}
    return text, tensors, _sharding.any_sharded(live.values())


def write_adapter_files(out: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write what ``adapter_files`` returned into ``out`` (atomically, file by file)."""
    meta = {_META_KEY: text, _DIGEST_KEY: content_digest(tensors, text)}
    if out.is_file():
        raise CheckpointError(f"{out} is a file; pass a directory to save the adapter into")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    _remove_superseded(out)


def _remove_superseded(out: Path) -> None:
    """Delete a format-1 checkpoint that a save into ``out`` replaced; never a peft adapter's files.

    Left in place, its ``adapter_config.json`` would still be read (and refused) by peft.
    """
    config, weights = out / LEGACY_CONFIG_NAME, out / LEGACY_WEIGHTS_NAME
    doc = _json_doc(config)  # {} when missing or unreadable
    meta = _metadata(weights) if weights.exists() and not doc else {}
    if (doc.get("format") == FORMAT and "peft_type" not in doc) or _META_KEY in meta:
        weights.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_names: str | Sequence[str] | None = None,
) -> nn.Module:
    """Apply the adapters saved in ``directory`` to ``model`` (a fresh base) and load their weights.

    Their saved active/inactive state is restored. On any error nothing is left applied. A
    directory saved by HF peft (``save_pretrained``) is imported with ``interop.import_peft``, as
    the adapter ``"default"`` or the one name in ``adapter_names``.
    """
    wanted_names = None if adapter_names is None else name_list(adapter_names, "adapter_names")
    if checkpoint_layout(directory) == "peft":
        return _import_peft(model, Path(directory), wanted_names)
    doc, tensors = read_checkpoint(directory)
    entries = _select(doc["adapters"], wanted_names, directory)
    if wanted_names is not None:
        tensors = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in wanted_names}
    _check_fit_before_building(model, entries, tensors, directory)
    applied: list[str] = []
    try:
        for entry in entries:
            attach(model, _build_method(entry))
            applied.append(entry["name"])
        # Loading every adapter: any tensor of an adapter the config does not list is unexpected.
        load_adapter_state_dict(model, tensors, applied)
    except ValueError as err:
        _roll_back(model, applied)
        raise CheckpointError(f"{directory}: {err}") from err
    except BaseException:
        _roll_back(model, applied)
        raise
    for entry in entries:
        adapters(model)[entry["name"]].set_active(entry.get("active", True))
    return model


def _check_fit_before_building(
    model: nn.Module,
    entries: list[dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    directory: str | os.PathLike[str],
) -> None:
    """The configs must fit the file's tensors before anything real is allocated (see _dryrun)."""
    try:
        planned = planned_shapes(model, lambda: [_build_method(e) for e in entries])
        if planned is not None:
            check_tensors_fit(planned, tensors)
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from err


def _select(
    entries: list[dict[str, Any]], names: Sequence[str] | None, directory: str | os.PathLike[str]
) -> list[dict[str, Any]]:
    if names is None:
        return entries
    missing = sorted(set(names) - {e["name"] for e in entries})
    if missing:
        raise CheckpointError(
            f"{directory}: no adapter {missing} in {[e['name'] for e in entries]}"
        )
    return [e for e in entries if e["name"] in names]


PeftImporter = Callable[[nn.Module, Path, str], nn.Module]
# ``interop.peft`` builds on this module, so it hands its importer over when it is imported (the
# package imports it): ``load_adapter`` reads peft directories without importing interop itself.
_PEFT_IMPORTER: list[PeftImporter] = []


def register_peft_importer(importer: PeftImporter) -> None:
    """Make ``load_adapter`` read an HF peft directory with ``importer(model, path, name)``."""
    _PEFT_IMPORTER[:] = [importer]


def _import_peft(model: nn.Module, path: Path, names: Sequence[str] | None) -> nn.Module:
    if not _PEFT_IMPORTER:
        raise CheckpointError(f"{path} is an HF peft directory; import peftkit.interop to read it")
    wanted = ["default"] if names is None else list(names)
    if len(wanted) != 1:
        raise CheckpointError(
            f"{path} is an HF peft adapter directory, which holds one adapter; pass one name to "
            f"load it as, not {wanted}"
        )
    return _PEFT_IMPORTER[0](model, path, wanted[0])


def read_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config document and the tensors of a peftkit checkpoint directory.

    Reads the current layout and format 1 (``adapter_config.json`` with ``"format": "peftkit"``).
    """
    path = Path(directory)
    config_name, weights_name = _check_directory(path)
    tensors, meta = _read_weights(path / weights_name)
    text = meta_text = meta.get(_META_KEY)
    json_path = path / config_name
    if not json_path.exists() and meta_text is not None:
        warnings.warn(
            f"{json_path} is missing; using the config stored in {weights_name}",
            UserWarning,
            stacklevel=3,
        )
    if json_path.exists():
        json_text = json_path.read_text(encoding="utf-8")
        if meta_text is not None and json_text != meta_text:
            warnings.warn(
                f"{json_path} does not match the config stored in {weights_name} (an interrupted "
                "save?); using the one stored with the weights",
                UserWarning,
                stacklevel=3,
            )
        else:
            text = json_text
    if text is None:
        raise CheckpointError(f"{path}: no {config_name} and no config inside {weights_name}")
    return _parse_config(text, json_path), tensors


def _check_directory(path: Path) -> tuple[str, str]:
    """The config and weights file names of the checkpoint in ``path`` (current or format 1)."""
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds it")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    layout = checkpoint_layout(path)
    if layout == "peft":
        raise CheckpointError(
            f"{path} is an HF peft checkpoint; load it with peftkit.load_adapter(model, dir) or "
            "peftkit.interop.import_peft(model, dir)"
        )
    names = (
        (LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME)
        if layout == "peftkit-1"
        else (CONFIG_NAME, WEIGHTS_NAME)
    )
    if not (path / names[1]).exists():
        pickled = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise CheckpointError(
                f"{path / pickled[0]} is a pickle file; peftkit never unpickles (it can run code). "
                "Convert it to safetensors with code you trust, then load that"
            )
        inside = _checkpoints_inside(path)
        if inside:
            shown = ", ".join(inside[-5:]) + (
                f" (and {len(inside) - 5} more)" if len(inside) > 5 else ""
            )
            raise CheckpointError(
                f"{path} holds no {names[1]} but holds checkpoints: {shown}. It looks like a "
                f"training run's output_dir; pass one of them, e.g. {str(path / inside[-1])!r}"
            )
        raise CheckpointError(f"{path} holds no {names[1]}")
    return names


def _checkpoints_inside(path: Path) -> list[str]:
    """Names of the subdirectories of ``path`` that hold a checkpoint, ``checkpoint-N`` by step."""
    found = [
        p.name
        for p in path.iterdir()
        if p.is_dir()
        and (checkpoint_layout(p) is not None or re.fullmatch(r"checkpoint-\d+|best", p.name))
    ]

    def order(name: str) -> tuple[int, int, str]:
        step = name.removeprefix("checkpoint-")
        return (0, int(step), "") if step.isdigit() else (1, 0, name)

    return sorted(found, key=order)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a checksum written by peftkit is verified."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({err}); re-save it, or load an earlier checkpoint"
        ) from err
    stored = meta.get(_DIGEST_KEY)
    if stored is not None and stored != content_digest(tensors, meta.get(_META_KEY)):
        raise CheckpointError(
            f"{path} is corrupt: its contents do not match the checksum written when it was saved; "
            "re-save it, or load an earlier checkpoint"
        )
    return tensors, meta


def content_digest(tensors: dict[str, torch.Tensor], text: str | None) -> str:
    """SHA-256 over the config text and every tensor's name, dtype, shape and bytes (CPU tensors)."""
    digest = hashlib.sha256((text or "").encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _parse_config(text: str, json_path: Path) -> dict[str, Any]:
    path = json_path.parent
    doc = parse_json(text, json_path)
    if isinstance(doc, dict) and "peft_type" in doc:
        raise CheckpointError(
            f"{path} is an HF peft checkpoint; load it with peftkit.interop.import_peft(model, dir)"
        )
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a peftkit adapter config")
    check_document(doc, json_path, FORMAT_VERSION)
    if doc.get("format_version", 0) > FORMAT_VERSION:
        warnings.warn(
            f"{path} uses checkpoint format {doc['format_version']} (newer than "
            f"{FORMAT_VERSION}); loading what this version understands",
            UserWarning,
            stacklevel=4,
        )
    return doc


def _build_method(entry: dict[str, Any]) -> Any:
    entry_spec = spec(entry["method"])
    config = entry_spec.config_cls.from_dict(entry["config"])
    method = entry_spec.method_cls(config, entry["name"])
    method.load_extra_state(entry.get("state") or {})
    return method


def _roll_back(model: nn.Module, applied: list[str]) -> None:
    for name in reversed(applied):
        detach(model, name)


def _to_saveable(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors needs dense, contiguous, unshared CPU storage.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _atomic_write(final: Path, write: Callable[[str], Any]) -> None:
    """Write via ``write(tmp_path)``, fsync, then rename over ``final``: never a half-written file."""
    tmp = str(final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
