"""The mark a prefix hook leaves on a KV cache it filled, shared by the decoder and seq2seq hooks.

The mark says which adapters' prefixes the cache holds, so a later call can check it, and whether
the hook created the cache in the current call, so the cache can be dropped from the output when
the caller asked for none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ... import _compat

MARK = "_peftkit_prefix"


@dataclass
class CacheMark:
    """Stored on a cache that holds a prefix: which adapters' prefixes (name, length), in order."""

    signature: tuple[tuple[str, int], ...]
    fresh: bool  # created by the hook in the current call (not passed in by the caller)

    @property
    def length(self) -> int:
        return sum(n for _, n in self.signature)


def cache_mark(cache: object) -> CacheMark | None:
    mark = getattr(cache, MARK, None)
    return mark if isinstance(mark, CacheMark) else None


def drop_created_cache(
    mark: CacheMark | None, kwargs: dict[str, Any], config: Any, output: Any
) -> Any:
    """``output`` without the cache the hook created in this call when the caller asked for no
    cache (``use_cache`` false, or the model's default), or None to leave the output as it is."""
    if mark is None or not mark.fresh:
        return None
    mark.fresh = False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(config, "use_cache", False)
    if use_cache or _compat.output_cache(output) is None:
        return None
    return _compat.without_cache(output)
