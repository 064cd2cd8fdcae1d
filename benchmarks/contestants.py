"""What the benchmarks compare: the floor, every registered peftkit method, and HF peft's twins.

A contestant is named by a key that a fresh child process can rebuild from: ``floor``,
``peftkit:<method>``, ``torch:full`` (plain full fine-tuning, used while no method named ``full`` is
registered) and ``peft:<method>``. peftkit contestants come from the registry, so a newly registered
method shows up without edits here; ``VARIANTS`` adds forms of a registered method under their own
name (``dora``: LoRA with ``dora=True``). peft contestants pair with peftkit's by that name:
``PEFT_TWINS`` maps a name to a function that builds peft's config for the same setup, reading
peftkit's demo config for that name when the method is registered.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import peftkit
from peftkit.registry import spec

FLOOR = "floor"
TORCH_FULL = "torch:full"
GROUPED_PREFIX = "peftkit:prefix-grouped-sdpa"


@dataclass
class Prepared:
    """A model made ready to train one way, and how to step, regularise and merge it."""

    model: nn.Module
    params: list[nn.Parameter]
    regularizer: Callable[[], torch.Tensor | None] = lambda: None
    after_step: Callable[[int], None] = lambda step: None
    # For inference: whether the trained model is worth timing (adapters on its path), and how to
    # get a merged copy of it with a note on what the merge did (no copy, or a copy of None: the
    # method cannot merge; the note says why).
    infer: bool = True
    merged: Callable[[], tuple[nn.Module | None, str]] | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Contestant:
    key: str
    label: str
    family: str  # "floor", "peftkit", "torch" or "peft"
    method: str  # registry name it pairs on ("" for the floor)
    prepare: Callable[[nn.Module, int], Prepared]


# -- the floor and plain full fine-tuning -----------------------------------------------------------
def _floor(model: nn.Module, total_steps: int) -> Prepared:
    """Frozen base, backward through every layer: the input embeddings' output requires grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return Prepared(model, [], infer=False)


def _torch_full(model: nn.Module, total_steps: int) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, list(model.parameters()), infer=False)


# -- peftkit ---------------------------------------------------------------------------------------
# name -> (registered method, fields changed on its demo config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"dora": ("lora", {"dora": True})}


def demo_config(method: str, total_steps: int) -> peftkit.MethodConfig:
    if method in VARIANTS:
        base, changes = VARIANTS[method]
        return dataclasses.replace(demo_config(base, total_steps), **changes)
    return spec(method).method_cls.demo_config(total_steps)


def _peftkit(method: str, grouped: bool = False) -> Callable[[nn.Module, int], Prepared]:
    def prepare(model: nn.Module, total_steps: int) -> Prepared:
        config = demo_config(method, total_steps)
        peftkit.apply(model, config, adapter_name="bench")
        if grouped:  # the prefix with grouped-query SDPA under the mask (no repeated K/V heads)
            from peftkit.methods.prefix import grouped_sdpa

            grouped_sdpa(model)

        def merged() -> tuple[nn.Module | None, str]:
            # What a user deploys: a prefix's MLP folded away, then every mergeable layer merged.
            twin = copy.deepcopy(model)
            folded = peftkit.fold_prefix(twin)
            twin, report = peftkit.merge_and_unload(twin, report=True)
            if not report.kept:
                return twin, "fully merged"
            if not report.merged and not folded:
                return None, "cannot merge: " + "; ".join(sorted(set(report.kept.values())))
            done = ["prefix MLP folded"] if folded else []
            done += [f"merged {len(report.merged)} layer(s)"] if report.merged else []
            return twin, ", ".join(done) + f", kept {len(report.kept)}"

        return Prepared(
            model,
            peftkit.trainable_parameters(model),
            regularizer=lambda: peftkit.regularizer(model),
            after_step=lambda step: peftkit.step_hooks(model, step),
            merged=merged,
            config={"method": method, **config.to_dict()},
        )

    return prepare


# -- HF peft ----------------------------------------------------------------------------------------
def _fields(method: str, total_steps: int) -> dict[str, Any]:
    """peftkit's demo config for ``method`` as a dict, or {} when the method is not registered."""
    if method not in peftkit.methods():
        return {}
    return dataclasses.asdict(demo_config(method, total_steps))


def _peft_targets(fields: dict[str, Any]) -> str | list[str]:
    targets = fields.get("targets", peftkit.ALL_LINEAR)
    if targets == peftkit.ALL_LINEAR:
        return "all-linear"
    if any(t.startswith("re:") for t in targets):
        # peft takes one regular expression, matched in full against the dotted name.
        return "|".join(
            t[3:] if t.startswith("re:") else rf"(?:.*\.)?{re.escape(t)}" for t in targets
        )
    return list(targets)


def peft_lora_config(total_steps: int, **extra: Any) -> Any:
    """peft's LoraConfig for peftkit's LoRA demo config; ``extra`` overrides peft fields."""
    from peft import LoraConfig

    f = _fields("lora", total_steps)
    extra.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(
        r=f.get("r", 8),
        lora_alpha=f.get("alpha", 16),
        lora_dropout=f.get("dropout", 0.0),
        use_rslora=f.get("rslora", False),
        target_modules=_peft_targets(f),
        **extra,
    )


def peft_adalora_config(total_steps: int) -> Any:
    """peft's AdaLoraConfig for peftkit's AdaLoRA demo config (ranks, schedule, EMA, penalty)."""
    from peft import AdaLoraConfig

    f = _fields("adalora", total_steps)
    steps = {k: f[k] for k in ("t_init", "t_final", "delta_t") if k in f}
    schedule = peftkit.AdaLoraConfig(total_steps=total_steps, **steps)  # None: its fractions
    return AdaLoraConfig(
        init_r=f.get("init_r", 12),
        target_r=f.get("target_r", 8),
        lora_alpha=f.get("alpha", 16),
        lora_dropout=f.get("dropout", 0.0),
        total_step=total_steps,
        tinit=schedule.warmup_steps,
        tfinal=schedule.final_steps,
        deltaT=schedule.mask_every,
        beta1=f.get("beta1", 0.85),
        beta2=f.get("beta2", 0.85),
        orth_reg_weight=f.get("orth_reg_weight", 0.5),
        target_modules=_peft_targets(f),
        task_type="CAUSAL_LM",
    )


def peft_prefix_config(total_steps: int) -> Any:
    """peft's PrefixTuningConfig for peftkit's prefix demo config (length; MLP re-parametrisation)."""
    from peft import PrefixTuningConfig

    f = _fields("prefix", total_steps)
    mlp_hidden = f.get("mlp_hidden")
    extra = {"prefix_projection": True, "encoder_hidden_size": mlp_hidden} if mlp_hidden else {}
    return PrefixTuningConfig(
        num_virtual_tokens=f.get("prefix_length", 10), task_type="CAUSAL_LM", **extra
    )


PEFT_TWINS: dict[str, Callable[[int], Any]] = {
    "lora": peft_lora_config,
    "dora": lambda total_steps: peft_lora_config(total_steps, use_dora=True),
    "adalora": peft_adalora_config,
    "prefix": peft_prefix_config,
}


def _peft(method: str) -> Callable[[nn.Module, int], Prepared]:
    def prepare(model: nn.Module, total_steps: int) -> Prepared:
        from peft import get_peft_model

        config = PEFT_TWINS[method](total_steps)
        wrapped = get_peft_model(model, config)
        after_step: Callable[[int], None] = lambda step: None  # noqa: E731
        if method == "adalora":  # peft's rank allocator is called by hand after each step
            after_step = wrapped.base_model.update_and_allocate
        merged = None
        if hasattr(wrapped, "merge_and_unload") and method != "prefix":
            merged = lambda: (copy.deepcopy(wrapped).merge_and_unload(), "fully merged")  # noqa: E731
        return Prepared(
            wrapped,
            [p for p in wrapped.parameters() if p.requires_grad],
            after_step=after_step,
            merged=merged,
            config={"method": f"peft {type(config).__name__}", **_plain(config.to_dict())},
        )

    return prepare


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        for k, v in data.items()
    }


# -- the line-up -----------------------------------------------------------------------------------
def lineup(vs_peft: bool, extras: bool = False) -> list[Contestant]:
    """The floor, every registered method (and plain full fine-tuning if none is named ``full``),
    then peft's twins when asked for and installed. ``extras`` adds variants run only when named
    with ``--only`` (the prefix with ``grouped_sdpa``)."""
    out = [Contestant(FLOOR, "floor (frozen base)", "floor", "", _floor)]
    for name in [*peftkit.methods(), *VARIANTS]:
        out.append(Contestant(f"peftkit:{name}", name, "peftkit", name, _peftkit(name)))
    if extras and "prefix" in peftkit.methods():
        label, prepare = "prefix, grouped_sdpa", _peftkit("prefix", grouped=True)
        out.append(Contestant(GROUPED_PREFIX, label, "peftkit", "prefix+grouped_sdpa", prepare))
    if "full" not in peftkit.methods():
        label = "full (plain torch)"
        out.append(Contestant(TORCH_FULL, label, "torch", "full", _torch_full))
    if vs_peft:
        for name in PEFT_TWINS:
            out.append(Contestant(f"peft:{name}", f"peft {name}", "peft", name, _peft(name)))
    return out


def by_key(key: str, vs_peft: bool = True) -> Contestant:
    for contestant in lineup(vs_peft, extras=True):
        if contestant.key == key:
            return contestant
    raise KeyError(f"unknown contestant {key!r}")
