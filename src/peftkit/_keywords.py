"""The error for a keyword a config does not have: HF peft's name for a setting, or a typo.

``PEFT_NAMES`` is the one table: each keyword a peft user writes by habit, and what peftkit calls
that setting (or does instead). ``MethodConfig.__new__`` consults it for every config class, built in
or registered by a third party, so ``LoraConfig(lora_alpha=16)`` and ``apply_lora(model,
lora_alpha=16)`` both say ``alpha=``. A keyword that is not in the table gets the closest field names.
Only construction from keywords is checked: loading a saved config ignores unknown keys with a
warning (``MethodConfig.from_dict``), so a file written by a newer version still loads.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# method name -> config class, filled in by ``registry.register_method`` (the registry builds on
# this module, so the table it reads lives here)
REGISTERED_CONFIGS: dict[str, type] = {}

NOTHING = object()  # a conversion's answer when no value carries over


def _same(value: Any) -> Any:
    return value


def _no_value(value: Any) -> Any:
    return NOTHING


def _patterns(value: Any) -> Any:
    """peft's module names: one string is a regular expression (full match), or a list of names."""
    if value == "all-linear":
        return value
    if isinstance(value, str):
        return ["re:" + value]
    if isinstance(value, Sequence | set):
        return sorted(value) if isinstance(value, set) else list(value)
    return NOTHING


def _indices(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else NOTHING


def _init(value: Any) -> Any:
    return {True: "kaiming", "gaussian": "gaussian"}.get(value, NOTHING)


@dataclass(frozen=True)
class PeftName:
    """What a peft keyword is in peftkit.

    fields: the peftkit fields that hold the same setting, tried in order; the first one the config
        class has is suggested. Empty when peftkit has no such setting.
    convert: the peft value -> the value to suggest, or ``NOTHING`` when it does not carry over.
    note: what else to know, or what to do instead when no field corresponds.
    """

    fields: tuple[str, ...] = ()
    convert: Callable[[Any], Any] = _same
    note: str = ""


_RANKS = (
    "LoRA's rank is r=; AdaLoRA's are init_r= (at the start) and target_r= (average at the end)"
)
_SHAPES = "peftkit reads the shapes from the model it is applied to; drop the keyword"
_BASE = (
    "a peftkit adapter does not name its base model: load the base yourself and pass it to "
    "peftkit.load_adapter(model, path)"
)

PEFT_NAMES: Mapping[str, PeftName] = {
    # LoRA and AdaLoRA
    "r": PeftName(("r", "init_r"), note=_RANKS),
    "rank": PeftName(("r", "init_r"), note=_RANKS),
    "lora_alpha": PeftName(("alpha",)),
    "lora_dropout": PeftName(("dropout",)),
    "target_modules": PeftName(("targets",), _patterns),
    "exclude_modules": PeftName(("exclude",), _patterns),
    "layers_to_transform": PeftName(("layers",), _indices),
    "use_rslora": PeftName(("rslora",)),
    "init_lora_weights": PeftName(
        ("init",),
        _init,
        "peftkit's init is 'kaiming' or 'gaussian'; B starts at zero with either, so the adapted "
        "model starts out equal to the base",
    ),
    "fan_in_fan_out": PeftName(
        note="not needed: peftkit recognises transformers' Conv1D (GPT-2) by its type and handles "
        "its (in, out) weight itself; drop the keyword"
    ),
    "bias": PeftName(
        ("biases_only",),
        lambda value: {"all": True, "none": False}.get(value, NOTHING),
        note="peftkit keeps base biases frozen; to train them too (peft's bias='all'), add a second "
        "adapter that trains them in place: peftkit.apply_full(model, biases_only=True, "
        "adapter_name='bias')",
    ),
    "use_dora": PeftName(("dora",)),
    "lora_bias": PeftName(note="peftkit's LoRA has no trained bias on B"),
    # AdaLoRA's schedule
    "total_step": PeftName(("total_steps",)),
    "tinit": PeftName(("t_init",)),
    "tfinal": PeftName(("t_final",)),
    "deltaT": PeftName(("delta_t",)),
    # prefix-tuning
    "num_virtual_tokens": PeftName(("prefix_length",)),
    "encoder_hidden_size": PeftName(
        ("mlp_hidden",), note="the prefix trains through an MLP exactly when mlp_hidden is set"
    ),
    "prefix_projection": PeftName(
        ("mlp_hidden",),
        _no_value,
        "mlp_hidden=<hidden width> trains the prefix through an MLP (peft's prefix_projection=True); "
        "mlp_hidden=None, the default, trains it directly",
    ),
    "token_dim": PeftName(note=_SHAPES),
    "num_attention_heads": PeftName(note=_SHAPES),
    "num_layers": PeftName(note=_SHAPES),
    "num_transformer_submodules": PeftName(note=_SHAPES),
    # every method
    "task_type": PeftName(
        note="peftkit has no task types: it adapts the model you pass. The task head of an HF "
        "*For* model (classifier, score, qa_outputs) trains in full by default (train_head=False "
        "keeps it frozen); TrainConfig(task=...) picks the loss"
    ),
    "inference_mode": PeftName(
        note="peftkit configs have no mode: call model.eval() and run under torch.no_grad(), or "
        "merge the adapter in with model = peftkit.merge_and_unload(model)"
    ),
    "peft_type": PeftName(note="the config class is the method (LoraConfig, AdaLoraConfig, ...)"),
    "base_model_name_or_path": PeftName(note=_BASE),
    "revision": PeftName(note=_BASE),
}


def init_fields(cls: type) -> list[str]:
    """The names a config class accepts as keywords, in definition order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def unknown_keywords_error(cls: type, unknown: Mapping[str, Any]) -> TypeError:
    """One line per keyword ``cls`` does not have, each naming what to write instead."""
    return TypeError("\n".join(_explain(cls, key, value) for key, value in unknown.items()))


def _explain(cls: type, key: str, value: Any) -> str:
    head = f"{cls.__name__} has no field {key!r}"
    fields = init_fields(cls)
    known = PEFT_NAMES.get(key)
    if known is None:
        return f"{head}; {_closest(key, value, fields)}"
    tail = f"; {known.note}" if known.note else ""
    field = next((f for f in known.fields if f in fields), None)
    if field is not None:
        carried = known.convert(value)
        guess = "" if carried is NOTHING else f" (did you mean {field}={carried!r}?)"
        return f"{head}; peftkit calls it {field}={guess}{tail}"
    if not known.fields:
        return f"{head}{tail}"
    where = _owners(known.fields)
    # The note says what to do; without one, the fields the class does have are the best help.
    tail = tail or f"; {_listing(fields)}"
    return f"{head}; peftkit calls it {where}, which {cls.__name__} does not have{tail}"


def _closest(key: str, value: Any, fields: list[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    if len(close) == 1:
        return f"did you mean {close[0]}={value!r}?"
    if close:
        return "closest fields: " + ", ".join(f"{name}=" for name in close)
    return _listing(fields)


def _listing(fields: list[str]) -> str:
    return "its fields are: " + ", ".join(fields)


def _owners(names: tuple[str, ...]) -> str:
    """``alpha= (LoraConfig, AdaLoraConfig)``: which registered config classes have these fields."""
    classes = list(REGISTERED_CONFIGS.values())
    parts = []
    for name in names:
        owners = [c.__name__ for c in classes if name in init_fields(c)]
        if owners:
            parts.append(f"{name}= ({', '.join(owners)})")
    return " or ".join(parts) or " / ".join(f"{n}=" for n in names)
