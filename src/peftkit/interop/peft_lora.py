"""LoRA in peft's format (``peft_type: "LORA"``).

Tensors: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` for Linear, GPT-2 Conv1D and
Conv2d (same shapes as peftkit's factors), ``<path>.lora_embedding_A`` / ``lora_embedding_B`` for
embeddings, ``<path>.lora_magnitude_vector`` for DoRA's magnitude (``use_dora``; (out,), Conv2d
(1, out, 1, 1)), and ``<path>.<name>`` for each tensor of a ``modules_to_save`` copy. The scale is
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module through ``rank_pattern`` and
``alpha_pattern``, whose keys peft matches as regular expressions after a dot.

Which modules carry an adapter is read from the tensors, not re-derived from peft's targeting rules,
and written back as the shortest exact name lists, so selection is identical in both libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _compat
from ..layers import AdapterLayer, SavedModule
from ..methods.base import Method
from ..methods.lora import LoraConfig, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from ..methods.lora_torch import LoraConv1d, LoraMultiheadAttention
from ..targeting import is_conv1d, is_linear, iter_modules
from .peft import (
    Converted,
    InteropError,
    PeftAdapter,
    PeftConverter,
    drop_base_copies,
    exact_names,
    pattern_names,
    register_peft_converter,
)

PREFIX = "base_model.model."
PEFT_DEFAULT_R = 8  # what peft uses when adapter_config.json omits r / lora_alpha
PEFT_DEFAULT_ALPHA = 8
_LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
_FACTORS = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "lora_magnitude",
}
# peft keeps an nn.MultiheadAttention's out-projection factors on a LoRA layer it puts at
# ``<attention>.base_layer.out_proj`` (the in-projection's stand on the attention module itself).
OUT_PROJ = "base_layer.out_proj"
_EXPORTABLE = (LoraLinear, LoraEmbedding, LoraConv2d, LoraConv1d, LoraMultiheadAttention)
MAGNITUDE_KEY = "lora_magnitude_vector"
# peft options that change what the adapter computes and that peftkit cannot represent.
REFUSED = {
    "use_dora": "DoRA (use_dora=True)",  # LoRA reads it; the other methods refuse it
    "lora_bias": "a trained bias on lora_B (lora_bias=True)",
    "layer_replication": "layer replication (it duplicates base layers)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
# peft options that do not change what a loaded adapter computes (bookkeeping, targeting rules that
# the tensors already settle, or settings only used when peft initialises a new adapter).
NEUTRAL = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "modules_to_save", "fan_in_fan_out", "init_lora_weights", "megatron_core",
    "qalora_group_size", "loftq_config", "eva_config", "corda_config",
})  # fmt: skip
# Initialisations that leave the base weights alone (the others rewrite them in peft).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@register_peft_converter
class LoraConverter(PeftConverter):
    method = "lora"
    peft_type = "LORA"

    def to_peft(self, model: nn.Module, method: Method) -> PeftAdapter:
        config = method.config
        assert isinstance(config, LoraConfig)
        lora = [layer for layer in method.layers if isinstance(layer, LoraLayer)]
        saved = [layer for layer in method.layers if isinstance(layer, SavedModule)]
        for layer in lora:
            _check_exportable(layer, config)
        universe = peft_module_names(model)
        aliases = [x.path for x in [*lora, *saved] if x.path not in universe]
        if aliases:
            raise InteropError(
                f"{aliases} are second names of modules peft knows under another name; "
                "apply the adapter by the module's first name in model.named_modules()"
            )
        return PeftAdapter(
            _export_fields(config, lora, saved, universe), _export_tensors(lora, saved)
        )

    def from_peft(self, model: nn.Module, adapter: PeftAdapter) -> Converted:
        cfg = adapter.config
        check_supported({k: v for k, v in cfg.items() if k != "use_dora"})
        dora = bool(cfg.get("use_dora", False))
        modules = dict(iter_modules(model))
        found, rest = _split_tensors(adapter.tensors)
        r, alpha = cfg.get("r", PEFT_DEFAULT_R), cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        ranks, alphas = {}, {}
        for path, factors in found.items():
            _check_importable(path, factors, modules)
            _check_magnitude(path, factors, dora)
            ranks[path] = factors.rank(path)
            expected = peft_pattern_value(cfg.get("rank_pattern") or {}, path, r)
            if ranks[path] != expected:
                raise InteropError(
                    f"{path}: the tensors have rank {ranks[path]} but the config says {expected}"
                )
            alphas[path] = peft_pattern_value(cfg.get("alpha_pattern") or {}, path, alpha)
        rest = drop_base_copies(rest, found, modules)  # peft's copies of embedding weights
        saved = saved_tensors(list(modules), cfg.get("modules_to_save") or [], rest)
        universe = [n for n in modules if n]
        try:
            config = LoraConfig(
                r=r,
                alpha=alpha,
                dropout=cfg.get("lora_dropout", 0.0),
                rslora=bool(cfg.get("use_rslora", False)),
                targets=exact_names(universe, list(found)) if found else [],
                rank_pattern=pattern_names(ranks, r),
                alpha_pattern=pattern_names(alphas, alpha),
                modules_to_save=exact_names(universe, list(saved), what="modules_to_save"),
                dora=dora,
            )
        except InteropError:
            raise
        except ValueError as err:
            raise InteropError(f"the peft config does not make a valid LoraConfig: {err}") from err
        tensors = {f"{p}.{k}": t for p, f in found.items() for k, t in f.tensors(p).items()}
        tensors.update({f"{p}.trained.{k}": t for p, own in saved.items() for k, t in own.items()})
        return Converted(config, tensors)


def _export_fields(
    config: LoraConfig, lora: list[LoraLayer], saved: list[SavedModule], universe: list[str]
) -> dict[str, Any]:
    paths = [layer.path for layer in lora]
    to_save = exact_names(
        universe, [layer.path for layer in saved], peft_saved_match, "modules_to_save"
    )
    check_targets_not_excluded(paths, to_save)
    alphas = {p: config.alpha_for(p) for p in paths}
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": exact_names(universe, paths),
        "rank_pattern": _escaped(pattern_names({x.path: x.r for x in lora}, config.r)),
        "alpha_pattern": _escaped(pattern_names(alphas, config.alpha)),
        "modules_to_save": to_save or None,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer()) for layer in lora),
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": config.dora,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
    }


def _export_tensors(lora: list[LoraLayer], saved: list[SavedModule]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for layer in lora:
        embedding = isinstance(layer, LoraEmbedding)
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else _LINEAR_KEYS
        tensors[f"{PREFIX}{layer.path}.{a}"] = layer.lora_A
        tensors[f"{PREFIX}{layer.path}.{b}"] = layer.lora_B
        if isinstance(layer, LoraMultiheadAttention):  # peft adds this update n times
            count = _compat.peft_attention_out_count()
            tensors[f"{PREFIX}{layer.path}.{OUT_PROJ}.{a}"] = layer.lora_out_A
            tensors[f"{PREFIX}{layer.path}.{OUT_PROJ}.{b}"] = layer.lora_out_B.detach() / count
        magnitude = getattr(layer, "lora_magnitude", None)
        if isinstance(magnitude, torch.Tensor):  # peft keeps a convolution's as (1, out, 1, 1)
            shape = (1, -1, 1, 1) if isinstance(layer, LoraConv2d) else (-1,)
            tensors[f"{PREFIX}{layer.path}.{MAGNITUDE_KEY}"] = magnitude.reshape(shape)
    for module in saved:
        for name, tensor in module.trained.state_dict().items():
            tensors[f"{PREFIX}{module.path}.{name}"] = tensor
    return tensors


def check_supported(
    cfg: dict[str, Any], neutral: frozenset[str] = NEUTRAL, method: str = "LoRA"
) -> None:
    """Raise ``InteropError`` naming the first peft option peftkit cannot represent.

    ``neutral`` lists the options known not to change what a loaded adapter computes; ``method``
    names the peftkit method in messages.
    """
    for key, what in REFUSED.items():
        if cfg.get(key):
            raise InteropError(f"{what} is not supported by peftkit's {method}")
    if cfg.get("bias", "none") != "none":
        raise InteropError(
            f"bias={cfg['bias']!r} (peft trained base biases) is not supported; "
            f"peftkit's {method} keeps every base parameter frozen"
        )
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise InteropError(
            f"init_lora_weights={init!r}: peft rewrote the base weights for this initialisation, "
            "so the adapter only fits that modified base; save it from peft with "
            "path_initial_model_for_weight_conversion to get a plain LoRA, then import that"
        )
    unknown = sorted(k for k, v in cfg.items() if k not in neutral and k not in REFUSED and v)
    if unknown:
        raise InteropError(
            f"peft options {unknown} are set; peftkit does not know what they change, so it will "
            "not guess (remove them from adapter_config.json only if they do not affect outputs)"
        )


def peft_pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's rule for rank_pattern / alpha_pattern: the first key (a regex) matching after a dot."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as err:
            raise InteropError(
                f"pattern {key!r} is not a valid regular expression ({err})"
            ) from err
    return default


def _escaped(patterns: dict[str, Any]) -> dict[str, Any]:
    # peft reads pattern keys as regular expressions; module names are literal.
    return {re.escape(k): v for k, v in patterns.items()}


def peft_saved_match(name: str, pattern: str) -> bool:
    # peft selects modules_to_save by a plain suffix test, without a dot boundary.
    return name.endswith(pattern)


def peft_module_names(model: nn.Module) -> list[str]:
    """Module names as peft sees them: each module once, under its first name."""
    seen: set[int] = set()
    names = []
    for name, module in iter_modules(model):
        inner = unwrap_layer(module)
        if name and id(inner) not in seen:
            names.append(name)
        seen.add(id(inner))
    return names


def check_targets_not_excluded(paths: list[str], to_save: list[str]) -> None:
    # peft never adapts a module whose name contains a modules_to_save entry as a component.
    for name in to_save:
        hit = [p for p in paths if re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", p)]
        if hit:
            raise InteropError(f"peft would skip {hit}: they sit under modules_to_save {name!r}")


def _check_exportable(layer: LoraLayer, config: LoraConfig) -> None:
    base = layer.base_layer()
    if not isinstance(layer, _EXPORTABLE):
        raise InteropError(f"{layer.path}: {type(layer).__name__} has no peft equivalent")
    _check_base(layer.path, base)
    if layer.scaling != config.scaling_for(layer.path) or layer.r != config.rank_for(layer.path):
        raise InteropError(
            f"{layer.path}: rank or scale was changed after the adapter was applied; "
            "peft derives both from the config"
        )


def _check_base(path: str, base: nn.Module) -> None:
    if isinstance(base, nn.Conv1d | nn.Conv2d) and any(d != 1 for d in base.dilation):
        raise InteropError(
            f"{path}: {type(base).__name__} with dilation={tuple(base.dilation)}; peft's LoRA "
            "convolution has no dilation, so the two would compute different outputs"
        )
    if isinstance(base, nn.Embedding) and type(base).forward is not nn.Embedding.forward:
        raise InteropError(
            f"{path}: {type(base).__name__} changes the embedding in its own forward (e.g. a "
            "scale); peft and peftkit treat the LoRA update differently there"
        )


@dataclass
class _Factors:
    """One module's LoRA factors as found in a peft file."""

    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    lora_magnitude: torch.Tensor | None = None
    embedding: bool = False
    out: _Factors | None = None  # an nn.MultiheadAttention's out-projection factors

    def tensors(self, path: str) -> dict[str, torch.Tensor]:
        if self.lora_A is None or self.lora_B is None:
            raise InteropError(f"{path}: the adapter has only one of lora_A and lora_B")
        own = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude is not None:  # peftkit keeps it as (out,) for every layer type
            own["lora_magnitude"] = self.lora_magnitude.reshape(-1)
        if self.out is not None:
            out = self.out.tensors(f"{path}.{OUT_PROJ}")
            count = _compat.peft_attention_out_count()  # what peft computed with them
            own.update({"lora_out_A": out["lora_A"], "lora_out_B": out["lora_B"] * count})
        return own

    def rank(self, path: str) -> int:
        return int(self.tensors(path)["lora_A"].shape[0])


def _split_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, _Factors], dict[str, torch.Tensor]]:
    """LoRA factors by module path, and the other tensors (modules_to_save), prefix removed."""
    factors: dict[str, _Factors] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise InteropError(f"tensor {key!r} does not start with {PREFIX!r}; not a LoRA adapter")
        name = key[len(PREFIX) :]
        suffix = next((s for s in _FACTORS if name.endswith("." + s)), None)
        if suffix is None:
            rest[name] = tensor
            continue
        found = factors.setdefault(name[: -len(suffix) - 1], _Factors())
        found.embedding = found.embedding or suffix.startswith("lora_embedding")
        setattr(found, _FACTORS[suffix], tensor)
    return _attention_pairs(factors), rest


def _attention_pairs(factors: dict[str, _Factors]) -> dict[str, _Factors]:
    """Factors found under ``<attention>.base_layer.out_proj`` joined to ``<attention>``'s."""
    out = {p: f for p, f in factors.items() if p.endswith("." + OUT_PROJ)}
    kept = {p: f for p, f in factors.items() if p not in out}
    for path, found in out.items():
        owner = kept.get(path[: -len(OUT_PROJ) - 1])
        if owner is None:
            raise InteropError(
                f"{path}: the adapter has out-projection factors but none for the attention "
                "module's in-projection; peft always stores both"
            )
        owner.out = found
    return kept


def _check_importable(path: str, found: _Factors, modules: dict[str, nn.Module]) -> None:
    if path not in modules:
        raise InteropError(
            f"the adapter has tensors for {path!r}, which this model lacks; "
            "import it into the model it was trained on"
        )
    base = unwrap_layer(modules[path])
    _check_attention(path, found, base)
    linear_like = is_linear(base) or isinstance(base, _TORCH_LAYERS)
    if not (isinstance(base, nn.Embedding) if found.embedding else linear_like):
        kind = "embedding factors" if found.embedding else "lora_A/lora_B weights"
        raise InteropError(
            f"{path} is a {type(base).__name__} but the adapter stores {kind} for it; peftkit's "
            "LoRA imports Linear, GPT-2 Conv1D, Conv1d, Conv2d and MultiheadAttention "
            "(lora_A/lora_B) and Embedding layers"
        )
    _check_base(path, base)


_TORCH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def _check_attention(path: str, found: _Factors, base: nn.Module) -> None:
    """An nn.MultiheadAttention has factors for both projections, of one rank; no other module has
    out-projection factors."""
    attention = isinstance(base, nn.MultiheadAttention)
    if attention != (found.out is not None):
        what = "lacks" if attention else "has"
        raise InteropError(
            f"{path} is a {type(base).__name__} but the adapter {what} factors under "
            f"{path}.{OUT_PROJ}; import it into the model it was trained on"
        )
    if found.out is not None and found.out.rank(path) != found.rank(path):
        raise InteropError(
            f"{path}: the out-projection factors have rank {found.out.rank(path)} but the "
            f"in-projection's have rank {found.rank(path)}; peftkit gives both one rank"
        )


def _check_magnitude(path: str, found: _Factors, dora: bool) -> None:
    has = found.lora_magnitude is not None
    if dora and found.embedding:
        raise InteropError(
            f"{path}: DoRA on an embedding; peftkit's DoRA adapts Linear, GPT-2 Conv1D and Conv2d"
        )
    if has != dora:
        what = "has no lora_magnitude_vector" if dora else "has a lora_magnitude_vector"
        raise InteropError(
            f"{path}: the adapter {what} but the config says use_dora={dora}; the file and its "
            "adapter_config.json do not belong together"
        )


def unwrap_layer(module: nn.Module) -> nn.Module:
    return module.base_layer() if isinstance(module, AdapterLayer) else module


def saved_tensors(
    names: list[str], patterns: list[str], rest: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of each modules_to_save copy, by module path (modules without tensors skipped)."""
    candidates = sorted(
        (n for n in names if n and any(peft_saved_match(n, p) for p in patterns)),
        key=len,
        reverse=True,  # the longest path first, so a key goes to its innermost saved module
    )
    out: dict[str, dict[str, torch.Tensor]] = {}
    left = dict(rest)
    for path in candidates:
        mine = {k[len(path) + 1 :]: t for k, t in left.items() if k.startswith(path + ".")}
        if mine:
            out[path] = mine
            left = {k: t for k, t in left.items() if not k.startswith(path + ".")}
    if left:
        shown = sorted(left)[:5]
        raise InteropError(
            f"tensors {shown} are neither LoRA factors nor part of a modules_to_save module; "
            "peftkit cannot place them"
        )
    return out
