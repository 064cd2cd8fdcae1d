"""Configuration base classes.

Every method's configuration is a frozen, keyword-only dataclass. ``__post_init__`` validates and raises
a ``ValueError`` that names the fix; it never rewrites a field. Runtime state (AdaLoRA's live ranks, for
example) lives on the method instance, not here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from ._keywords import init_fields, unknown_keywords_error
from ._patterns import check_regex

C = TypeVar("C", bound="MethodConfig")

ALL_LINEAR = "all-linear"


def _check_patterns(name: str, value: object) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name} must be a list of module names, e.g. {name}=['q_proj'], got {value!r}"
        )
    for item in value:
        check_pattern(name, item)


def check_pattern(name: str, item: object) -> None:
    """One module pattern: a non-empty name suffix, or ``re:<regex>`` of bounded cost."""
    if not isinstance(item, str) or not item:
        raise ValueError(f"{name} entries must be non-empty strings, got {item!r}")
    if item.startswith("re:"):
        check_regex(f"{name} entry {item[:40]!r}", item[3:])


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_probability(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_finite_number(name: str, value: object, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and float(value) <= 0):  # type: ignore[arg-type]
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


ADAPTER_DTYPES = ("auto", "base")


def check_adapter_dtype(value: object) -> None:
    if value not in ADAPTER_DTYPES:
        raise ValueError(
            f"adapter_dtype must be 'auto' (float32 on a bf16/fp16 or quantized base) or 'base' "
            f"(the base's compute dtype), got {value!r}"
        )


@dataclass(frozen=True, kw_only=True)
class TrainDefaults:
    """The training settings a method is known to want: what the Trainer uses for a
    ``TrainConfig`` field the user left unset (``None``).

    lr: the peak learning rate (AdamW, after warm-up).  why: where it comes from, in one line.
    """

    lr: float
    why: str = ""

    def __post_init__(self) -> None:
        check_finite_number("lr", self.lr, positive=True)


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Fields every method shares.

    modules_to_save: modules (name suffixes, or ``re:<regex>`` full matches) trained in full and saved
        with the adapter, e.g. a freshly initialised task head. Each adapter trains its own copy.
    train_head: whether the task head of an HF ``*For*`` model (a classifier, ``score``,
        ``qa_outputs``...; never a language model's output embeddings) trains in full and is saved
        with the adapter, as if listed in ``modules_to_save``. ``None`` (auto): when the model has
        one and no earlier adapter holds it; ``True``: the same, but a model without one is an
        error; ``False``: never.
    """

    modules_to_save: Sequence[str] = ()
    train_head: bool | None = None

    method: ClassVar[str] = ""  # filled in by ``register_method``
    # The lr (and any other training setting) this method is known to want; None: it declares
    # none, and the Trainer falls back to training.defaults.FALLBACK_LR.
    train_defaults: ClassVar[TrainDefaults | None] = None
    # Keys a config written by an older version lacks, with the value that reproduces what that
    # version did (before train_head existed no head trained unless listed in modules_to_save).
    absent_means: ClassVar[dict[str, Any]] = {"train_head": False}

    def training_defaults(self) -> TrainDefaults | None:
        """The training settings this config wants: its class's ``train_defaults``. A method whose
        best rate depends on its fields (prefix-tuning with or without its MLP) overrides this."""
        return self.train_defaults

    def __new__(cls: type[C], *args: Any, **fields: Any) -> C:
        """Refuse keywords the class has no field for, naming the field to use instead.

        The check sits here, before the dataclass ``__init__``, so every subclass gets it and the
        message can name peftkit's spelling of a peft keyword (``lora_alpha`` -> ``alpha``), from
        the one table in ``peftkit._keywords``; ``__init__`` would only say "unexpected keyword".
        """
        accepted = init_fields(cls)
        unknown = {k: v for k, v in fields.items() if k not in accepted}
        if unknown:
            raise unknown_keywords_error(cls, unknown)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        _check_patterns("modules_to_save", self.modules_to_save)
        if self.train_head is not None and not isinstance(self.train_head, bool):
            raise ValueError(
                f"train_head must be None (auto), True or False, got {self.train_head!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values (sequences become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from JSON data. Unknown keys (from a newer version) are ignored with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown keys {unknown} (written by a newer peftkit?)",
                UserWarning,
                stacklevel=2,
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(
                f"{cls.__name__}: the saved config lacks required keys {missing} (written by "
                "another version of the method?); re-save the adapter with the version you load with"
            )
        given = {k: _from_json(v) for k, v in data.items() if k in names}
        older = {k: v for k, v in cls.absent_means.items() if k in names and k not in data}
        return cls(**{**older, **given})


@dataclass(frozen=True, kw_only=True)
class TargetedConfig(MethodConfig):
    """Fields of methods that wrap selected submodules.

    targets: ``"all-linear"`` (every linear layer except the output head), or a list whose entries are
        name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``) or ``"re:<regex>"``
        (a full match against the dotted module name).
    exclude: entries of the same form; matching modules are never targeted.
    layers: keep only modules inside these block indices (``model.layers.<i>``, ``transformer.h.<i>``...).
    layers_pattern: the name of the block list when it is not one of the usual ones.
    adapter_dtype: ``"auto"`` keeps the adapter's own parameters in float32 on a bf16/fp16 or
        quantized base (the forward casts them, not the activations, to the base's dtype) and in
        the base's dtype otherwise; ``"base"`` keeps them in the base's compute dtype.
    """

    targets: Sequence[str] | str = ALL_LINEAR
    exclude: Sequence[str] = ()
    layers: Sequence[int] | None = None
    layers_pattern: str | None = None
    adapter_dtype: Literal["auto", "base"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                raise ValueError(
                    f"targets={self.targets!r}: pass a list (targets=[{self.targets!r}]) or "
                    f"{ALL_LINEAR!r}; use 're:<regex>' entries for regular expressions"
                )
        else:
            _check_patterns("targets", self.targets)
            if not self.targets:
                raise ValueError("targets is empty: name modules to adapt, or use 'all-linear'")
        _check_patterns("exclude", self.exclude)
        if self.layers is not None:
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or isinstance(self.layers, str):
                raise ValueError(f"layers must be non-negative block indices, got {self.layers!r}")
        if self.layers_pattern is not None and (
            not isinstance(self.layers_pattern, str) or not self.layers_pattern
        ):
            raise ValueError("layers_pattern must be a non-empty name such as 'layers'")
        check_adapter_dtype(self.adapter_dtype)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    # Sequences come back from JSON as lists; configs store them as tuples so they stay immutable.
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value
