"""mkdocs hook: the "Methods" section lists every page in docs/methods/, known methods first.

A nav entry whose value is a folder ("methods/") is replaced by that folder's pages, each titled by
its first "# " heading, so a method branch adds docs/methods/<name>.md and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORDER = ["lora", "adalora", "adapter", "prefix", "full"]


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem


def _pages(docs_dir: Path, folder: str) -> list[dict[str, str]]:
    pages = sorted((docs_dir / folder).glob("*.md"))
    rank = {name: i for i, name in enumerate(ORDER)}
    pages.sort(key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))
    return [{_title(p): f"{folder.rstrip('/')}/{p.name}"} for p in pages]


def _expand(items: list[Any], docs_dir: Path) -> list[Any]:
    out = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, str) and value.endswith("/"):
                value = _pages(docs_dir, value)
            elif isinstance(value, list):
                value = _expand(value, docs_dir)
            item = {title: value}
        out.append(item)
    return out


def on_config(config: Any, **_: Any) -> Any:
    config["nav"] = _expand(config["nav"] or [], Path(config["docs_dir"]))
    return config
