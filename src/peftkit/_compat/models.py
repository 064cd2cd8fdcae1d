"""What peftkit reads from a transformers model: attention flags, activation checkpointing, block
classes, GPT-2's Conv1D, task heads, ``save_pretrained``, dummy inputs, encoder-decoder parts."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .versions import _missing


# -- attention ---------------------------------------------------------------------------------
def causal_flags(module: nn.Module) -> set[bool]:
    """The ``is_causal`` flags transformers' attention modules inside ``module`` declare: {True}
    for decoders, {False} for BERT-style encoders, empty where none declares one (Bloom).

    transformers 4.x's BERT-style layers declare no ``is_causal`` but an ``is_decoder`` switch
    (False in an encoder); where no module declares ``is_causal``, those are read instead."""
    modules = list(module.modules())
    flags = {bool(m.is_causal) for m in modules if isinstance(getattr(m, "is_causal", None), bool)}
    if flags:
        return flags
    return {bool(m.is_decoder) for m in modules if isinstance(getattr(m, "is_decoder", None), bool)}


# -- activation checkpointing ------------------------------------------------------------------
def checkpointing_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules that carry transformers' per-module ``gradient_checkpointing`` flag."""
    return [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]


def enable_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Switch HF activation checkpointing on with ``kwargs`` (e.g. ``use_reentrant=False``)."""
    new: Callable[..., Any] | None = getattr(model, "activation_checkpointing_enable", None)
    old: Callable[..., Any] | None = getattr(model, "gradient_checkpointing_enable", None)
    if callable(new):  # transformers 5.x
        new(activation_checkpointing_kwargs=kwargs)
    elif callable(old):  # transformers 4.x
        old(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            "gradient_checkpointing needs an HF model (activation_checkpointing_enable or "
            "gradient_checkpointing_enable); for other models wrap blocks in torch.utils.checkpoint"
        )


# -- sharding ----------------------------------------------------------------------------------
def no_split_modules(model: nn.Module) -> list[str]:
    """The class names of an HF model's blocks (its ``_no_split_modules``), or []; FSDP2 shards
    per block."""
    names = getattr(model, "_no_split_modules", None)
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list | tuple | set) else []


# -- layer classes -----------------------------------------------------------------------------
def conv1d_class() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` when transformers is already imported, else None.

    A model cannot hold a transformers Conv1D unless transformers is loaded, so peftkit never
    imports it just to ask.
    """
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:
        raise _missing("transformers.pytorch_utils.Conv1D", f"({err})") from None
    return Conv1D


# -- task heads --------------------------------------------------------------------------------
def _tied_names(model: nn.Module) -> set[str]:
    """First components of the keys transformers declares tied (``lm_head`` of ``lm_head.weight``)."""
    declared = getattr(model, "_tied_weights_keys", None) or ()
    keys = list(declared.items()) if isinstance(declared, Mapping) else [(k, "") for k in declared]
    return {str(target).split(".", 1)[0] for target, _ in keys}


def task_heads(model: nn.Module) -> list[str]:
    """Names of the children of an HF ``*For*`` model that form its task head, in model order.

    The head is what sits beside the body (``model.<base_model_prefix>``) and owns parameters of
    its own: BERT's ``classifier``, GPT-2's and Llama's ``score``, ``qa_outputs``, GPT-2's
    ``multiple_choice_head``. A child sharing a parameter with the body, holding the output
    embeddings, or declared tied (a language model's ``lm_head``, BERT's ``cls``) is not one.
    A model that is its own body (``BertModel``, ``T5ForConditionalGeneration``) has none, and so
    does any model that is not a transformers model.
    """
    prefix = getattr(type(model), "base_model_prefix", None)
    body = model._modules.get(prefix) if isinstance(prefix, str) and prefix else None
    if body is None or "transformers" not in sys.modules:
        return []
    taken = {id(p) for p in body.parameters()}
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if isinstance(output, nn.Module):
        taken |= {id(p) for p in output.parameters()}
    tied = _tied_names(model)
    heads = []
    for name, child in model.named_children():
        params = {id(p) for p in child.parameters()}
        if name != prefix and name not in tied and params and not params & taken:
            heads.append(name)
    return heads


# -- save_pretrained ---------------------------------------------------------------------------
def save_pretrained_state_dict_argument(model: nn.Module) -> bool:
    """Whether ``model.save_pretrained`` (its class's) takes the ``state_dict`` to write."""
    method = getattr(type(model), "save_pretrained", None)
    return callable(method) and "state_dict" in inspect.signature(method).parameters


def hook_save_pretrained(model: nn.Module, plain: Callable[[nn.Module, Any], Any]) -> bool:
    """Make ``model.save_pretrained`` write ``plain(model, state_dict)`` instead of its raw state.

    Only this instance changes (an attribute that shadows the class's method); nothing global is
    patched. Returns False for a model without an HF ``save_pretrained``.
    """
    if not save_pretrained_state_dict_argument(model):
        return False
    model.__dict__["save_pretrained"] = _PlainSave(model, plain)
    return True


def unhook_save_pretrained(model: nn.Module) -> None:
    """Undo ``hook_save_pretrained`` (no-op when it was not hooked)."""
    if isinstance(model.__dict__.get("save_pretrained"), _PlainSave):
        del model.__dict__["save_pretrained"]


class _PlainSave:
    """``model.save_pretrained`` of one hooked model. It holds the model itself (not a weak
    reference) so that ``copy.deepcopy`` and pickling carry it over to the copy."""

    def __init__(self, model: nn.Module, plain: Callable[[nn.Module, Any], Any]) -> None:
        self.model = model
        self.plain = plain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        save = type(self.model).save_pretrained  # type: ignore[attr-defined]
        call = inspect.signature(save).bind(self.model, *args, **kwargs)
        call.arguments["state_dict"] = self.plain(self.model, call.arguments.get("state_dict"))
        return save(*call.args, **call.kwargs)


def dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Tiny example inputs an HF model offers for a trial forward (``PreTrainedModel.dummy_inputs``,
    a dict of tensors), or None for other models or when the model cannot build them."""
    if "transformers" not in sys.modules:
        return None
    try:
        inputs = getattr(model, "dummy_inputs", None)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a property that cannot build
        return None
    if not isinstance(inputs, Mapping) or not inputs:
        return None
    if not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return None
    return dict(inputs)


# -- encoder-decoder models ----------------------------------------------------------------------
def encoder_decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(encoder, decoder) of a transformers encoder-decoder model (``config.is_encoder_decoder``
    and the public ``get_encoder()`` / ``get_decoder()``), or None for any other model."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder, get_decoder = (
        getattr(model, "get_encoder", None),
        getattr(model, "get_decoder", None),
    )
    if not callable(get_encoder) or not callable(get_decoder):
        return None
    encoder, decoder = get_encoder(), get_decoder()
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        return None
    return encoder, decoder


def learned_positions(decoder: nn.Module) -> nn.Module | None:
    """A decoder's learned position embedding that numbers tokens from the cache length (BART's,
    mBART's ``embed_positions``, called with ``position_ids``), or None (T5: relative positions)."""
    module = getattr(decoder, "embed_positions", None)
    if not isinstance(module, nn.Embedding):
        return None
    params = inspect.signature(module.forward).parameters
    return module if "position_ids" in params else None
