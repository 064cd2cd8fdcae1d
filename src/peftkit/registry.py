"""The one registry: method name <-> config class <-> method class.

A method registers itself with a decorator next to its definition; nothing else needs editing::

    @register_method("lora", LoraConfig)
    class Lora(SwapMethod): ...

The built-in methods are registered by the time any of this runs: importing any part of peftkit
imports the package first, and the package imports ``peftkit.methods``. The registry itself
imports no method, so methods can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from . import _keywords
from .config import MethodConfig

if TYPE_CHECKING:
    from .methods.base import Method

M = TypeVar("M", bound="type[Method]")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    method_cls: type[Method]


_BY_NAME: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type[MethodConfig], *, override: bool = False
) -> Callable[[M], M]:
    """Class decorator that makes a method available to ``apply``, checkpoints and the demo.

    Registering a name twice is an error unless ``override=True`` (useful when a notebook cell that
    defines a method is run again).
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r} must be non-empty letters, digits, '_' or '-'")
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"config_cls must subclass peftkit.MethodConfig, got {config_cls!r}")

    def decorate(method_cls: M) -> M:
        taken = _BY_NAME.get(name)
        if taken is not None and not override:
            raise ValueError(
                f"method {name!r} is already registered by {taken.method_cls.__qualname__}; "
                "pass override=True to replace it"
            )
        stale = [n for n, s in _BY_NAME.items() if s.config_cls is config_cls and n != name]
        if stale:
            raise ValueError(f"{config_cls.__name__} already belongs to method {stale[0]!r}")
        method_cls.name = name
        method_cls.config_cls = config_cls
        config_cls.method = name
        _BY_NAME[name] = MethodSpec(name, config_cls, method_cls)
        _keywords.REGISTERED_CONFIGS[name] = config_cls
        return method_cls

    return decorate


def methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_BY_NAME)


def spec(name: str) -> MethodSpec:
    """The registry entry for ``name``; unknown names list what is registered."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"no method named {name!r} is registered; registered: {sorted(_BY_NAME)}. "
            "A third-party method must be imported (so its @register_method runs) before use."
        ) from None


def spec_for_config(config: MethodConfig) -> MethodSpec:
    """The registry entry whose config class is ``type(config)`` (or its nearest base)."""
    for cls in type(config).__mro__:
        for entry in _BY_NAME.values():
            if entry.config_cls is cls:
                return entry
    raise TypeError(
        f"{type(config).__name__} is not the config of any registered method; "
        "decorate your method class with @register_method(name, ConfigClass)"
    )
