"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

``flatten`` turns nested state (optimiser and scaler state dicts, RNG states, counters) into a JSON
document plus a flat ``{key: tensor}`` map; ``unflatten`` reverses it exactly, including tuples,
integer dict keys and numpy arrays. Checkpoint directories are written under a temporary name and
renamed into place, so a directory named ``checkpoint-N`` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import _sharding
from ..checkpoint import (
    _DIGEST_KEY as DIGEST_KEY,
)
from ..checkpoint import (
    CheckpointError,
    adapter_files,
    checkpoint_layout,
    content_digest,
    load_adapter,
    read_checkpoint,
    write_adapter_files,
)
from ..core import adapters, delete_adapter, load_adapter_state_dict

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
CHECKSUM_FORMAT = (
    2  # the Trainer's state format from which trainer_state.safetensors has a checksum
)
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


# -- nested state <-> JSON + tensors -------------------------------------------------------------
def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """``obj`` as JSON data; its tensors and arrays are moved into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj)
        return {_ARRAY: path, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        items = list(obj.items())
        return {_ITEMS: [[k, flatten(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(items)]}
    if isinstance(obj, (list, tuple)):
        flat = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {_TUPLE: flat} if isinstance(obj, tuple) else flat
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} in the training state")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten``."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        return tensors[obj[_ARRAY]].numpy().astype(obj["dtype"])
    if _TUPLE in obj:
        return tuple(unflatten(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_key(k): unflatten(v, tensors) for k, v in obj[_ITEMS]}
    return {k: unflatten(v, tensors) for k, v in obj.items()}


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``trainer_state.json`` + ``trainer_state.safetensors`` in ``directory``.

    The tensors file carries a SHA-256 of the JSON text and every tensor (``content_digest``, as
    adapter checkpoints do), verified by ``read_state``.
    """
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(flatten(state, tensors), indent=1) + "\n"
    meta = {DIGEST_KEY: content_digest(tensors, text)}
    save_file(tensors, str(directory / STATE_TENSORS), metadata=meta)
    (directory / STATE_JSON).write_text(text, encoding="utf-8")


def read_state(directory: Path) -> dict[str, Any]:
    """The training state written by ``write_state``, or a ``CheckpointError`` naming the file."""
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    missing = [p.name for p in (json_path, tensor_path) if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a training checkpoint (no {' or '.join(missing)}); pass a "
            "checkpoint-N directory written by the Trainer, or resume_from='latest' with the "
            "same output_dir"
        )
    text = json_path.read_text(encoding="utf-8", errors="replace")
    doc = _parse_state(text, json_path)
    tensors, meta = _read_state_tensors(tensor_path)
    stored = meta.get(DIGEST_KEY)
    if stored is None and _format(doc) >= CHECKSUM_FORMAT:  # older formats had no checksum
        raise CheckpointError(
            f"{tensor_path} has no checksum, though {STATE_JSON} says the Trainer wrote one (the "
            f"file was rewritten by another tool?); {_EARLIER}"
        )
    if stored is not None and stored != content_digest(tensors, text):
        raise CheckpointError(
            f"{directory}: {STATE_JSON} and {STATE_TENSORS} do not match the checksum written "
            f"when they were saved (edited or corrupt); {_EARLIER}"
        )
    try:
        state = unflatten(doc, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{json_path} does not fit {tensor_path} ({err}); {_EARLIER}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_path} is not a training state; {_EARLIER}")
    return state


_EARLIER = "resume from an earlier checkpoint-N, or start a new run in another output_dir"


def _format(doc: Any) -> int:
    value = doc.get("format", 0) if isinstance(doc, dict) else 0
    return value if isinstance(value, int) else 0


def _parse_state(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(
            f"{path} is truncated or not valid JSON ({reason}); {_EARLIER}"
        ) from err


def _read_state_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        if _looks_pickled(path):
            raise CheckpointError(
                f"{path} is a pickle (torch.save) file, not safetensors; peftkit never unpickles "
                f"(it can run code). {_EARLIER[0].upper()}{_EARLIER[1:]}"
            ) from err
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); {_EARLIER}") from err


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2 to 5) or torch.save's zip archive, judged by the first bytes only."""
    with open(path, "rb") as f:
        head = f.read(4)
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or (
        head == b"PK\x03\x04"
    )


# -- weights ---------------------------------------------------------------------------------------
def save_weights(model: nn.Module, directory: Path | None) -> None:
    """The adapters (``save_adapter``), or for a model without adapters its trainable parameters.

    FSDP2 shards are gathered to full tensors, which every process must take part in: the other
    processes call this with ``directory=None`` and write nothing.
    """
    if adapters(model):
        text, tensors, _ = adapter_files(model)
        if directory is not None:
            write_adapter_files(directory, text, tensors)
        return
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    full = {
        name: t.detach().to("cpu", copy=True).contiguous()
        for name, t in _sharding.full_tensors(trainable).items()
    }
    if directory is not None:
        save_file(full, str(directory / TRAINABLE_WEIGHTS))


def load_weights(model: nn.Module, directory: Path) -> None:
    """Restore what ``save_weights`` wrote into ``model``.

    Adapters identical to the saved ones (names, methods, configs) and without runtime state are
    loaded in place, keeping parameter objects (and references to them) alive. Otherwise the model's
    adapters are removed and the saved ones applied through ``load_adapter``, so a method's runtime
    state (``extra_state``, e.g. AdaLoRA's live ranks) is restored the way its own loader expects.
    """
    if checkpoint_layout(directory) in ("peftkit", "peftkit-1"):
        doc, tensors = read_checkpoint(directory)
        if _same_adapters(model, doc["adapters"]):
            load_adapter_state_dict(model, tensors)
            return
        for name in reversed(list(adapters(model))):
            delete_adapter(model, name)
        load_adapter(model, directory)
        return
    tensors = load_file(str(directory / TRAINABLE_WEIGHTS))
    params = dict(model.named_parameters())
    wrong = sorted(k for k in tensors if k not in params or params[k].shape != tensors[k].shape)
    if wrong:
        raise CheckpointError(f"{directory}: tensors {wrong[:5]} do not fit this model")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(_sharding.like(params[name], value))


def _same_adapters(model: nn.Module, entries: list[dict[str, Any]]) -> bool:
    methods = adapters(model)
    if [e["name"] for e in entries] != list(methods):
        return False
    return all(
        e["method"] == methods[e["name"]].name
        and e["config"] == methods[e["name"]].config.to_dict()
        and not e.get("state")
        and not methods[e["name"]].extra_state()
        and bool(e.get("active", True)) == methods[e["name"]].active
        for e in entries
    )


# -- random number generators --------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and (when initialised) CUDA generator states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- directories -----------------------------------------------------------------------------------
@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are fsynced and it is renamed to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.{uuid.uuid4().hex}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` directories in ``output_dir``, oldest first."""
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_JSON).exists():
            found.append((int(suffix), path))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints (None keeps all)."""
    if keep is None:
        return
    for _, path in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
