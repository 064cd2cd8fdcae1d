"""The one door to transformers' internals: every name peftkit relies on, found by capability.

Each helper answers one question about the installed transformers (what the KV-cache argument is
called, which cache class prefix-tuning can fill, how a cache layer holds its tensors, how
checkpointing is switched on) by looking at what the installed version offers, never by comparing
version numbers. Where the answer is "nothing usable", the error names the installed version and
the missing piece. ``tests/test_compat_touchpoints.py`` checks every helper on the installed
version, so a release that moves one of them fails there first, by name.

The pieces and where they changed:

- KV-cache keyword of a model's ``forward``: ``past_key_values`` up to 5.23, ``cache`` from 5.24
  (the old name still works there through a deprecation shim that warns). peftkit reads the name
  from the signature of the module it calls, and accepts either from its callers.
- The cache field of model outputs: ``past_key_values`` up to 5.23, ``cache`` from 5.24.
- ``DynamicCache(config=...)`` with per-layer objects in ``cache.layers`` (``DynamicLayer``, or a
  sliding-window kind) holding ``keys`` / ``values``: 4.57 and later.
- ``cache_position`` (an index into the cache) is still taken by models of 4.57 and early 5.x.
- Attention modules declare ``is_causal`` (True in decoders, False in BERT-style encoders).
- Activation checkpointing: ``activation_checkpointing_enable`` (5.x) or
  ``gradient_checkpointing_enable`` (4.x); the per-module flag is ``gradient_checkpointing``.
- GPT-2's ``Conv1D``: ``transformers.pytorch_utils.Conv1D``.
- Task heads: a ``*For*`` model holds its body under ``base_model_prefix`` and its head beside it;
  ``get_output_embeddings()`` and ``_tied_weights_keys`` (a list up to 4.x, a dict in 5.x) name
  the language-model head, which is pretrained or tied and so is not a task head.
- ``save_pretrained(directory, state_dict=...)`` writes the given tensors under their keys; when
  ``state_dict`` is None it reads ``self.state_dict()``. The HF Trainer's ``save_model`` and its
  checkpoints call the model's ``save_pretrained`` (looked up on the instance).
- ``PreTrainedModel.dummy_inputs``: a dict of tiny example tensors the model can run on, used for
  one trial forward that finds selected modules the forward never calls (T5's ``shared``).
- peft (the one piece of it read here): its LoRA on nn.MultiheadAttention adds the out-projection
  update twice (up to 0.21.2 at least); the peft interop scales those factors to match.

The package has one module per kind of piece: ``versions`` (the supported window and the error
for a missing piece), ``cache``, ``models``, ``attention`` and ``peft_side``. Callers use the names
re-exported here (``from peftkit import _compat``; ``_compat.cache_argument(...)``), never a
submodule, so a test can stand in for one helper by patching it here.

Nothing here imports transformers at module import time: ``import peftkit`` stays free of it.
"""

from __future__ import annotations

from .attention import (
    GROUPED_SDPA,
    attention_implementation,
    register_grouped_sdpa,
    set_attention_implementation,
)
from .cache import (
    CACHE_ARGUMENTS,
    CACHE_POSITION,
    PrependingCache,
    cache_argument,
    cache_layer_kinds,
    cached_keys_values,
    cross_attention_updated,
    fillable_layer_names,
    full_attention_layer_name,
    is_encoder_decoder_cache,
    is_fillable_dynamic,
    is_full_attention_dynamic,
    new_dynamic_cache,
    new_encoder_decoder_cache,
    output_cache,
    take_cache,
    without_cache,
)
from .models import (
    causal_flags,
    checkpointing_modules,
    conv1d_class,
    dummy_inputs,
    enable_checkpointing,
    encoder_decoder_parts,
    hook_save_pretrained,
    learned_positions,
    no_split_modules,
    save_pretrained_state_dict_argument,
    task_heads,
    unhook_save_pretrained,
)
from .peft_side import (
    peft_attention_out_count,
)
from .versions import (
    SEQ2SEQ_PREFIX_MIN,
    TRANSFORMERS_MIN,
    TRANSFORMERS_TESTED,
    UnsupportedModelError,
    check_transformers_version,
    transformers_version,
    transformers_window,
)

__all__ = [
    "CACHE_ARGUMENTS",
    "CACHE_POSITION",
    "GROUPED_SDPA",
    "SEQ2SEQ_PREFIX_MIN",
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_TESTED",
    "PrependingCache",
    "UnsupportedModelError",
    "attention_implementation",
    "cache_argument",
    "cache_layer_kinds",
    "cached_keys_values",
    "causal_flags",
    "check_transformers_version",
    "checkpointing_modules",
    "conv1d_class",
    "cross_attention_updated",
    "dummy_inputs",
    "enable_checkpointing",
    "encoder_decoder_parts",
    "fillable_layer_names",
    "full_attention_layer_name",
    "hook_save_pretrained",
    "is_encoder_decoder_cache",
    "is_fillable_dynamic",
    "is_full_attention_dynamic",
    "learned_positions",
    "new_dynamic_cache",
    "new_encoder_decoder_cache",
    "no_split_modules",
    "output_cache",
    "peft_attention_out_count",
    "register_grouped_sdpa",
    "save_pretrained_state_dict_argument",
    "set_attention_implementation",
    "take_cache",
    "task_heads",
    "transformers_version",
    "transformers_window",
    "unhook_save_pretrained",
    "without_cache",
]
