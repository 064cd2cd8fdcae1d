"""AdaLoRA in peft's format (``peft_type: "ADALORA"``).

Tensors per adapted module: ``base_model.model.<path>.lora_A`` (r × in), ``lora_B`` (out × r) and
``lora_E`` (r × 1) — peftkit's Q, P and λ (λ as a column). peft stores only the live triplets after
pruning, as peftkit does, and records which of the ``init_r`` triplets survived in the config's
``rank_pattern``: ``{"<path>.lora_E": [True, False, ...]}`` (``init_r`` flags, as many True as the
stored rank); on loading, peft first builds every module at ``init_r`` and then shrinks it to that
pattern. ``modules_to_save`` tensors are stored as for LoRA.

Scale: peftkit's s = alpha / init_r; peft's is ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum =
init_r`` (not saved; peft keeps the initial value after shrinking). The two differ by the 1e-5 in
the denominator, a relative 1e-5 / init_r of the update, below float32 resolution of the outputs
in practice; ``alpha`` is carried over unchanged so a round trip keeps the config as it was.

The schedule fields map one to one (``total_step`` ↔ ``total_steps``, ``tinit`` ↔ ``t_init``,
``tfinal`` ↔ ``t_final``, ``deltaT`` ↔ ``delta_t``, betas, ``orth_reg_weight``). They matter only
for training; peft's orthogonality penalty is the (unsquared) Frobenius norm, peftkit's the
squared one, so ``orth_reg_weight`` carries over by name, not by effect.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers import SavedModule
from ..methods.adalora import AdaLoraConfig, AdaLoraLayer
from ..methods.base import Method
from ..targeting import is_conv1d, is_linear, iter_modules
from .peft import (
    Converted,
    InteropError,
    PeftAdapter,
    PeftConverter,
    exact_names,
    register_peft_converter,
)
from .peft_lora import (
    NEUTRAL,
    PREFIX,
    check_supported,
    check_targets_not_excluded,
    peft_module_names,
    peft_saved_match,
    saved_tensors,
    unwrap_layer,
)

_KEYS = {"lora_A": "Q", "lora_B": "P", "lora_E": "lam"}
# peft AdaLoRA options beyond LoRA's that only steer training (the rank schedule and the penalty).
ADALORA_NEUTRAL = NEUTRAL | {
    "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
}  # fmt: skip
# What peft uses where adapter_config.json omits a field.
PEFT_DEFAULTS: dict[str, Any] = {"init_r": 12, "target_r": 8, "lora_alpha": 8, "tinit": 0}
PEFT_DEFAULTS |= {"tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}


@register_peft_converter
class AdaLoraConverter(PeftConverter):
    method = "adalora"
    peft_type = "ADALORA"

    def to_peft(self, model: nn.Module, method: Method) -> PeftAdapter:
        config = method.config
        assert isinstance(config, AdaLoraConfig)
        svd = [layer for layer in method.layers if isinstance(layer, AdaLoraLayer)]
        saved = [layer for layer in method.layers if isinstance(layer, SavedModule)]
        universe = peft_module_names(model)
        for layer in svd:
            _check_exportable(layer, config, universe)
        paths = [layer.path for layer in svd]
        to_save = exact_names(
            universe, [m.path for m in saved], peft_saved_match, "modules_to_save"
        )
        check_targets_not_excluded(paths, to_save)
        pruned = any(layer.live_rank() < config.init_r for layer in svd)
        fields = {
            "init_r": config.init_r,
            "target_r": config.target_r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "total_step": config.total_steps,
            "tinit": config.warmup_steps,
            "tfinal": config.final_steps,
            "deltaT": config.mask_every,
            "beta1": config.beta1,
            "beta2": config.beta2,
            "orth_reg_weight": config.orth_reg_weight,
            "target_modules": exact_names(universe, paths),
            "rank_pattern": {f"{x.path}.lora_E": _flags(x, config.init_r) for x in svd}
            if pruned
            else None,
            "modules_to_save": to_save or None,
            "fan_in_fan_out": any(is_conv1d(layer.base_layer()) for layer in svd),
            "bias": "none",
            "init_lora_weights": True,
        }
        return PeftAdapter(fields, _export_tensors(svd, saved))

    def from_peft(self, model: nn.Module, adapter: PeftAdapter) -> Converted:
        cfg = {**PEFT_DEFAULTS, **{k: v for k, v in adapter.config.items() if v is not None}}
        check_supported(cfg, ADALORA_NEUTRAL, "AdaLoRA")
        if not cfg["lora_alpha"] > 0:
            raise InteropError(
                f"lora_alpha={cfg['lora_alpha']!r}: peft then scales each module by its own "
                "current rank, which peftkit's AdaLoRA (one scale alpha / init_r) cannot represent"
            )
        modules = dict(iter_modules(model))
        found, rest = _split_tensors(adapter.tensors)
        flags = dict(adapter.config.get("rank_pattern") or {})
        ranks = {p: _import_rank(p, t, flags, cfg["init_r"], modules) for p, t in found.items()}
        saved = saved_tensors(list(modules), cfg.get("modules_to_save") or [], rest)
        universe = [n for n in modules if n]
        to_save = exact_names(universe, list(saved), what="modules_to_save")
        config = _config(cfg, exact_names(universe, list(found)), to_save)
        tensors = {
            f"{p}.{_KEYS[k]}": t.reshape(-1) if k == "lora_E" else t
            for p, own in found.items()
            for k, t in own.items()
        }
        tensors.update({f"{p}.trained.{k}": t for p, own in saved.items() for k, t in own.items()})
        pruned = bool(flags)
        state = {"rank_pattern": ranks, "masked": pruned, "final": pruned}
        return Converted(config, tensors, state)


def _config(cfg: dict[str, Any], targets: list[str], to_save: list[str]) -> AdaLoraConfig:
    try:
        return AdaLoraConfig(
            total_steps=cfg.get("total_step"),  # type: ignore[arg-type]
            init_r=cfg["init_r"],
            target_r=cfg["target_r"],
            alpha=cfg["lora_alpha"],
            dropout=cfg.get("lora_dropout", 0.0),
            t_init=cfg["tinit"],
            t_final=cfg["tfinal"],
            delta_t=cfg["deltaT"],
            beta1=cfg["beta1"],
            beta2=cfg["beta2"],
            orth_reg_weight=cfg["orth_reg_weight"],
            targets=targets,
            modules_to_save=to_save,
        )
    except ValueError as err:
        raise InteropError(f"the peft config does not make a valid AdaLoraConfig: {err}") from err


def _flags(layer: AdaLoraLayer, init_r: int) -> list[bool]:
    """peft's record of which of the init_r triplets are live (the stored rank = number of True)."""
    if layer.r == init_r:
        return [bool(v) for v in layer.mask.tolist()]
    live = layer.live_rank()  # rebuilt at its saved rank: which triplets survived is not known
    return [True] * live + [False] * (init_r - live)


def _check_exportable(layer: AdaLoraLayer, config: AdaLoraConfig, universe: list[str]) -> None:
    if layer.path not in universe:
        raise InteropError(
            f"{layer.path!r} is a second name of a module peft knows under another name; "
            "apply the adapter by the module's first name in model.named_modules()"
        )
    if "default" in layer.path:
        # peft strips the adapter name from rank_pattern keys by a substring test.
        raise InteropError(
            f"{layer.path!r} contains 'default', peft's adapter name, so peft would misread its "
            "rank_pattern entry; rename the module"
        )
    if layer.scaling != config.alpha / config.init_r or layer.r > config.init_r:
        raise InteropError(
            f"{layer.path}: rank or scale was changed after the adapter was applied; "
            "peft derives both from the config"
        )


def _export_tensors(svd: list[AdaLoraLayer], saved: list[SavedModule]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for layer in svd:
        live = layer.live_tensors()
        tensors[f"{PREFIX}{layer.path}.lora_A"] = live["Q"]
        tensors[f"{PREFIX}{layer.path}.lora_B"] = live["P"]
        tensors[f"{PREFIX}{layer.path}.lora_E"] = live["lam"].unsqueeze(1)
    for module in saved:
        for name, tensor in module.trained.state_dict().items():
            tensors[f"{PREFIX}{module.path}.{name}"] = tensor
    return tensors


def _split_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """lora_A / lora_B / lora_E by module path, and the other tensors, prefix removed."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise InteropError(
                f"tensor {key!r} does not start with {PREFIX!r}; not an AdaLoRA adapter"
            )
        name = key[len(PREFIX) :]
        path, _, leaf = name.rpartition(".")
        if leaf in _KEYS:
            found.setdefault(path, {})[leaf] = tensor
        elif leaf == "weight" and path.rpartition(".")[2] in (
            "lora_embedding_A",
            "lora_embedding_B",
        ):
            raise InteropError(f"{name}: peftkit's AdaLoRA has no embedding layers")
        else:
            rest[name] = tensor
    return found, rest


def _import_rank(
    path: str,
    own: dict[str, torch.Tensor],
    flags: dict[str, Any],
    init_r: int,
    modules: dict[str, nn.Module],
) -> int:
    """The stored rank of ``path``, checked against its tensors, base module and rank_pattern."""
    missing = [k for k in _KEYS if k not in own]
    if missing:
        raise InteropError(f"{path}: the adapter lacks {missing}")
    if path not in modules:
        raise InteropError(
            f"the adapter has tensors for {path!r}, which this model lacks; "
            "import it into the model it was trained on"
        )
    base = unwrap_layer(modules[path])
    if not is_linear(base):
        raise InteropError(
            f"{path} is a {type(base).__name__}; peftkit's AdaLoRA imports Linear and GPT-2 "
            "Conv1D layers only"
        )
    rank = int(own["lora_A"].shape[0])
    if own["lora_E"].shape != (rank, 1) or own["lora_B"].shape[-1] != rank:
        shapes = {k: tuple(t.shape) for k, t in own.items()}
        raise InteropError(f"{path}: inconsistent AdaLoRA tensor shapes {shapes}")
    pattern = flags.get(f"{path}.lora_E")
    expected = init_r if pattern is None else sum(bool(f) for f in pattern)
    if rank != expected or (pattern is not None and len(pattern) != init_r):
        raise InteropError(
            f"{path}: the tensors have rank {rank} but the config's init_r / rank_pattern says "
            f"{expected}"
        )
    return rank
