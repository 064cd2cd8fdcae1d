"""The mark a prefix hook leaves on a KV cache it filled, shared by the decoder and seq2seq hooks.

The mark says which adapters' prefixes the cache holds, so a later call can check it, and whether
the hook created the cache in the current call, so the cache can be dropped from the output when
the caller asked for none.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def signature_of(active: Sequence[Any]) -> tuple[tuple[str, int], ...]:
    """The mark's signature for these active prefix tables: (adapter name, length), in order."""
    return tuple((t.adapter_name, t.length) for t in active)


def continue_marked(
    cache: Any, mark: CacheMark, signature: tuple[tuple[str, int], ...], cache_arg: str
) -> tuple[Any, int, int]:
    """A cache this hook filled before, continued: (the cache, the real tokens already in it, the
    prefix length). A cache holding other adapters' prefixes is refused."""
    if mark.signature != signature:
        raise RuntimeError(
            f"the KV cache holds the prefixes {list(mark.signature)}, but the active prefix "
            f"adapters are {list(signature)}; start a new cache ({cache_arg}=None)"
        )
    return cache, cache.get_seq_length() - mark.length, mark.length


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
