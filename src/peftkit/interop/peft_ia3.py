"""IA3 in peft's format (``peft_type: "IA3"``).

Tensors: ``base_model.model.<path>.ia3_l``, shaped (out, 1) for an output scaling and (1, in) for a
feed-forward module (input scaling); peftkit keeps the same vector flat. Which modules are
feed-forward is written as ``feedforward_modules`` and read back from the tensors' shapes (checked
against the config), and ``<path>.<name>`` holds each tensor of a ``modules_to_save`` copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers import SavedModule
from ..methods.base import Method
from ..methods.ia3 import IA3Config, IA3Linear
from ..targeting import is_conv1d, iter_modules, linear_features
from .peft import (
    Converted,
    InteropError,
    PeftAdapter,
    PeftConverter,
    exact_names,
    register_peft_converter,
    suffix_match,
)
from .peft_lora import (
    PREFIX,
    check_targets_not_excluded,
    peft_module_names,
    peft_saved_match,
    saved_tensors,
    unwrap_layer,
)

KEY = "ia3_l"


@register_peft_converter
class IA3Converter(PeftConverter):
    method = "ia3"
    peft_type = "IA3"

    def to_peft(self, model: nn.Module, method: Method) -> PeftAdapter:
        ia3 = [layer for layer in method.layers if isinstance(layer, IA3Linear)]
        saved = [layer for layer in method.layers if isinstance(layer, SavedModule)]
        universe = peft_module_names(model)
        aliases = [x.path for x in [*ia3, *saved] if x.path not in universe]
        if aliases:
            raise InteropError(
                f"{aliases} are second names of modules peft knows under another name; "
                "apply the adapter by the module's first name in model.named_modules()"
            )
        paths = [layer.path for layer in ia3]
        to_save = exact_names(
            universe, [x.path for x in saved], peft_saved_match, "modules_to_save"
        )
        check_targets_not_excluded(paths, to_save)
        # peft wants feedforward_modules to be a subset of target_modules, name for name
        ff_names = exact_names(
            universe, [x.path for x in ia3 if x.scales_input], what="feedforward_modules"
        )
        out_names = exact_names(universe, [x.path for x in ia3 if not x.scales_input])
        config = {
            "target_modules": out_names + ff_names,
            "feedforward_modules": ff_names,
            "fan_in_fan_out": any(is_conv1d(layer.base_layer()) for layer in ia3),
            "modules_to_save": to_save or None,
            "init_ia3_weights": True,
            "exclude_modules": None,
        }
        tensors: dict[str, torch.Tensor] = {}
        for layer in ia3:
            shape = (1, -1) if layer.scales_input else (-1, 1)
            tensors[f"{PREFIX}{layer.path}.{KEY}"] = layer.ia3_l.detach().reshape(shape)
        for module in saved:
            for name, tensor in module.trained.state_dict().items():
                tensors[f"{PREFIX}{module.path}.{name}"] = tensor
        return PeftAdapter(config, tensors)

    def from_peft(self, model: nn.Module, adapter: PeftAdapter) -> Converted:
        cfg = adapter.config
        modules = dict(iter_modules(model))
        vectors, rest = _split(adapter.tensors)
        feedforward = [p for p, t in vectors.items() if _scales_input(p, t, cfg, modules)]
        saved = saved_tensors(list(modules), cfg.get("modules_to_save") or [], rest)
        universe = [n for n in modules if n]
        try:
            config = IA3Config(
                targets=exact_names(universe, list(vectors)) if vectors else [],
                feedforward=exact_names(list(vectors), feedforward, what="feedforward"),
                modules_to_save=exact_names(universe, list(saved), what="modules_to_save"),
            )
        except ValueError as err:
            raise InteropError(f"the peft config does not make a valid IA3Config: {err}") from err
        tensors = {f"{p}.{KEY}": t.reshape(-1) for p, t in vectors.items()}
        tensors.update({f"{p}.trained.{k}": t for p, own in saved.items() for k, t in own.items()})
        return Converted(config, tensors)


def _split(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """IA3 vectors by module path, and the other tensors (modules_to_save), prefix removed."""
    vectors: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise InteropError(f"tensor {key!r} does not start with {PREFIX!r}; not an IA3 adapter")
        name = key[len(PREFIX) :]
        if name.endswith("." + KEY):
            vectors[name[: -len(KEY) - 1]] = tensor
        else:
            rest[name] = tensor
    return vectors, rest


def _scales_input(
    path: str, vector: torch.Tensor, cfg: dict[str, Any], modules: dict[str, nn.Module]
) -> bool:
    """Whether the vector at ``path`` scales the module's input, from its shape (checked against
    the module and against ``feedforward_modules``)."""
    base = unwrap_layer(modules[path]) if path in modules else None
    if not isinstance(base, nn.Linear) and not (base is not None and is_conv1d(base)):
        raise InteropError(f"{path}: no linear layer or Conv1D of that name in the model")
    in_f, out_f = linear_features(base)
    listed = cfg.get("feedforward_modules") or []
    named = (
        any(suffix_match(path, p) for p in listed) if isinstance(listed, list) else None
    )  # a regex: trust the shape
    for scales_input, shape in ((True, (1, in_f)), (False, (out_f, 1))):
        if tuple(vector.shape) == shape and named in (None, scales_input):
            return scales_input
    raise InteropError(
        f"{path}: ia3_l has shape {tuple(vector.shape)}, but the module takes ({out_f}, 1) "
        f"(output) or (1, {in_f}) (feedforward_modules)"
    )
