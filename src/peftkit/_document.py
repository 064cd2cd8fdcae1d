"""The checked shape of a checkpoint's JSON document.

A checkpoint is a file anyone can edit, so every field is type-checked, never coerced:
``bool("false")`` is True, and ``"2" > 2`` is a bare ``TypeError``. Each refusal names the file,
the field and what it must be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ENTRY_TYPES: dict[str, tuple[type, str]] = {
    "method": (str, "a string"),
    "config": (dict, "an object"),
    "active": (bool, "true or false"),
    "state": (dict, "an object"),  # null (an older save) means no state
}
_RESAVE = "fix the file, or re-save the adapter with peftkit.save_adapter"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


def parse_json(text: str, path: Path) -> Any:
    """The JSON value in ``text`` (read from ``path``); a ``CheckpointError`` names the file when it
    is not valid JSON or nests too deeply for the parser (a hostile file, never a saved one)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    except RecursionError as err:
        raise CheckpointError(
            f"{path} nests its JSON too deeply to read (no checkpoint written by peftkit does); "
            f"{_RESAVE}"
        ) from err


def check_document(doc: dict[str, Any], path: Path, current: int) -> list[dict[str, Any]]:
    """The adapter entries of a peftkit config document, each field of the expected JSON type."""
    version = doc.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{path}: format_version must be an integer such as {current}, got {version!r}; "
            f"{_RESAVE}"
        )
    entries = doc.get("adapters")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{path} lists no adapters")
    for entry in entries:
        _check_entry(entry, path)
    names = [e["name"] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"{path} lists adapter {twice} more than once; {_RESAVE}")
    return entries


def _check_entry(entry: object, path: Path) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{path}: an adapter entry must be a JSON object with name, method and config, got "
            f"{entry!r:.60}; {_RESAVE}"
        )
    lacking = [k for k in ("name", "method", "config") if k not in entry]
    if lacking:
        raise CheckpointError(
            f"{path}: an adapter entry lacks {lacking}; each entry needs name, "
            "method and config (re-save the adapter with peftkit.save_adapter)"
        )
    name = entry["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"{path}: adapter name {name!r:.60} must be a string of letters, digits, '_' or '-'; "
            f"{_RESAVE}"
        )
    for key, (kind, what) in _ENTRY_TYPES.items():
        value = entry.get(key)
        absent = key not in entry or (key == "state" and value is None)
        if not absent and not isinstance(value, kind):
            raise CheckpointError(
                f"{path}: {key!r} of adapter {name!r} must be {what}, got {value!r:.60} "
                f"({type(value).__name__}); {_RESAVE}"
            )
