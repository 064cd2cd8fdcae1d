"""Prefix-tuning (Li & Liang, 2021): trainable keys and values prepended to every attention layer.

Each attention layer attends over ``[P_k; K]`` / ``[P_v; V]``: ``length`` virtual tokens whose keys and
values are learned, then the real ones. The base stays frozen; only the prefix (and modules_to_save)
trains. Optionally the prefix is produced by an MLP during training (more stable, per the paper) and
folded into plain tensors afterwards (``fold_prefix``); checkpoints always hold the folded prefix.

The prefix reaches attention through transformers' public KV-cache interface (see ``injection``), so
it works in training, in ``generate()`` with the cache, and with padded batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ... import _compat
from ..._state import adapters
from ...config import MethodConfig, TrainDefaults, check_finite_number, check_positive_int
from ...registry import register_method
from ..base import MergeReport, Method, apply_with
from .discovery import locate_seq2seq
from .injection import (
    TRANSFORMERS_RANGE,
    PrefixInjector,
    UnsupportedModelError,
    injector_of,
    located,
    supported_range,
)
from .seq2seq import EncoderDecoderInjector
from .table import KVShape, PrefixTable

__all__ = [
    "TRANSFORMERS_RANGE",
    "KVShape",
    "Prefix",
    "PrefixConfig",
    "PrefixTable",
    "UnsupportedModelError",
    "apply_prefix",
    "fold_prefix",
    "grouped_sdpa",
    "supported_range",
]

_KEY = "prefix.key_values"
_NOT_MERGEABLE = (
    "prefix-tuning adds attention keys and values, which no weight update reproduces; it stays "
    "(fold_prefix(model) removes its MLP)"
)


@dataclass(frozen=True, kw_only=True)
class PrefixConfig(MethodConfig):
    """Prefix-tuning settings.

    prefix_length: number of virtual tokens whose keys/values every attention layer attends to.
    mlp_hidden: train the prefix through an MLP (embedding -> linear -> tanh -> linear) of this hidden
        width; None trains the keys/values directly. ``fold_prefix`` drops the MLP after training.
    init_std: standard deviation of the random initial prefix (default 0.02: close to the base model
        at the start) or of the MLP's input embedding (default 1.0, as ``nn.Embedding``).
    init_token_ids: initialise the prefix with the keys/values the model computes for these tokens
        (``prefix_length`` ids; Li & Liang's initialisation from real words). Needs ``mlp_hidden=None``.
    positions_after_prefix: False (default): real tokens keep the base model's positions 0 … n−1.
        True: they take P … P+n−1 as if the prefix were P real tokens before them (explicit
        ``position_ids`` are shifted by P too), which is how HF peft counts them; adapters imported
        from peft use it, and a GPT-2 or BERT prefix needs it to be exported to peft.
    """

    prefix_length: int = 16
    mlp_hidden: int | None = None
    init_std: float | None = None
    init_token_ids: Sequence[int] | None = None
    positions_after_prefix: bool = False

    # The two forms want different rates (SST-2, MiniLM, 200 steps x 32, seed 0; the screening
    # table in benchmarks/README.md). The plain prefix (this class's default form): 67.2% at 3e-3,
    # 74.1% at 1e-2, 78.7% at 3e-2. Through an MLP (length 8, width 64): 76.0% at 1e-3, 78.1% at
    # 3e-3, 79.5% at 5e-3, and at 1e-2 it stops learning (50.9%). ``training_defaults`` picks by
    # ``mlp_hidden``.
    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=3e-2,
        why="the plain prefix: its keys and values start near zero and move directly; the best "
        "of 3e-3, 1e-2 and 3e-2 (the highest tried)",
    )
    mlp_train_defaults: ClassVar[TrainDefaults] = TrainDefaults(
        lr=5e-3,
        why="through an MLP every prefix entry moves with the MLP's weights: the best of 1e-3 to "
        "5e-3 measured, and 1e-2 breaks it",
    )

    def training_defaults(self) -> TrainDefaults | None:
        return self.train_defaults if self.mlp_hidden is None else self.mlp_train_defaults

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("prefix_length", self.prefix_length)
        if self.mlp_hidden is not None:
            check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.init_std is not None:
            check_finite_number("init_std", self.init_std, positive=True)
        if self.init_token_ids is not None:
            self._check_init_tokens()
        if not isinstance(self.positions_after_prefix, bool):
            raise ValueError(
                f"positions_after_prefix must be True or False, got {self.positions_after_prefix!r}"
            )

    def std(self, mlp: bool) -> float:
        """The initial standard deviation for a plain prefix or (``mlp``) the MLP's embedding."""
        if self.init_std is not None:
            return float(self.init_std)
        return 1.0 if mlp else 0.02

    def _check_init_tokens(self) -> None:
        ids = self.init_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"init_token_ids must be a list of token ids, got {ids!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"init_token_ids must be non-negative integers, got {list(ids)}")
        if len(ids) != self.prefix_length:
            raise ValueError(
                f"init_token_ids has {len(ids)} ids but prefix_length is {self.prefix_length}; "
                "give one id per virtual token"
            )
        if self.mlp_hidden is not None:
            raise ValueError(
                "init_token_ids sets the prefix itself, which an MLP would recompute; "
                "use mlp_hidden=None with init_token_ids"
            )


@register_method("prefix", PrefixConfig)
class Prefix(Method):
    """Trainable key/value prefixes on every attention layer of a transformers model."""

    starts_at_identity = False
    config: PrefixConfig

    @classmethod
    def demo_config(cls, total_steps: int) -> MethodConfig:
        return PrefixConfig(prefix_length=8, mlp_hidden=64)

    def __init__(self, config: MethodConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.table: PrefixTable | None = None
        self.start_folded = False  # set when loading a checkpoint, which holds the folded prefix

    # -- lifecycle ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        seq2seq = _compat.encoder_decoder_parts(model) is not None
        if seq2seq:
            if self.config.init_token_ids is not None and not self.start_folded:
                raise UnsupportedModelError(
                    "init_token_ids computes one prefix from a forward of the tokens, which an "
                    "encoder-decoder model's three attentions do not share; initialise the prefix "
                    "randomly (init_token_ids=None)"
                )
            injector: PrefixInjector | EncoderDecoderInjector = EncoderDecoderInjector.install(
                model
            )
            body = model
            existing = [t for t in injector.tables.values() if isinstance(t, PrefixTable)]
            shape = existing[0].shape if existing else locate_seq2seq(model)[1]
        else:
            body, shape, encoder = located(model)
        weight = next(body.parameters())
        mlp_hidden = None if self.start_folded else self.config.mlp_hidden
        table = PrefixTable(
            self.adapter_name,
            shape,
            self.config.prefix_length,
            mlp_hidden=mlp_hidden,
            init_std=self.config.std(mlp=mlp_hidden is not None),
            device=weight.device,
            dtype=weight.dtype,
        )
        table.positions_after_prefix = self.config.positions_after_prefix
        if self.config.init_token_ids is not None and not self.start_folded:
            _init_from_tokens(body, table, self.config.init_token_ids)
        if not seq2seq:
            injector = PrefixInjector.install(body, encoder)
        injector.tables[self.adapter_name] = table
        self.table = table
        self.inject_saved_modules(model)

    def remove(self, model: nn.Module) -> None:
        super().remove(model)
        found = injector_of(model)
        if found is not None:
            body, injector = found
            if self.adapter_name in injector.tables:
                del injector.tables[self.adapter_name]
            if not len(injector.tables):
                injector.uninstall(body)
        self.table = None

    def is_empty(self) -> bool:
        return super().is_empty() and self.table is None

    # -- tensors -----------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        yield from super().parameters()
        if self.table is not None:
            yield from self.table.parameters()

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Saved modules' tensors, and the prefix as a plain tensor (computed if an MLP makes it)."""
        own = super().state_dict(model)
        if self.table is not None:
            table = self.table
            own[_KEY] = table.key_values if table.key_values is not None else table.values_now()
        return own

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` in; an adapter still training through its MLP is folded to the loaded
        prefix (an MLP input that produces it cannot be recovered)."""
        rest = {k: v for k, v in tensors.items() if k != _KEY}
        super().load_state_dict(model, rest)
        if self.table is not None and _KEY in tensors:
            self.table.load(tensors[_KEY])

    def extra_state(self) -> dict[str, Any]:
        return {"folded": True}  # checkpoints hold the prefix itself, never the MLP

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.start_folded = bool(state.get("folded", False))

    # -- switching and merging ---------------------------------------------------------------
    def active_flags(self) -> Iterator[bool]:
        if self.table is not None:
            yield self.table.active
        yield from super().active_flags()

    def set_active(self, active: bool) -> None:
        if self.table is not None:
            self.table.active = active
        super().set_active(active)

    def merge(self, model: nn.Module, *, unload: bool) -> MergeReport:
        """Saved modules merge as usual; the prefix is not a weight update and stays (reported)."""
        report = super().merge(model, unload=unload)
        if self.table is not None:
            report.kept[f"{self.adapter_name}:prefix"] = _NOT_MERGEABLE
        return report

    def fold(self) -> bool:
        """Replace the MLP by the prefix it computes; False when there was none."""
        if self.table is None or self.table.folded:
            return False
        self.table.fold()
        return True

    def describe(self) -> dict[str, Any]:
        if self.table is None:
            return {}
        how = "plain" if self.table.folded else f"mlp {self.config.mlp_hidden}"
        return {"prefix": self.table.length, "table": how}


def grouped_sdpa(model: nn.Module, enabled: bool = True) -> bool:
    """Let a grouped-query model's SDPA attention keep its shared key/value heads under a mask.

    With a prefix the queries and keys differ in length, so transformers passes an explicit mask,
    and its SDPA path then repeats every key/value head once per query group before attention.
    ``grouped_sdpa(model)`` switches the model to an attention registered through transformers'
    public ``AttentionInterface`` that calls torch's SDPA with the mask and ``enable_gqa=True``
    (same outputs within float rounding, no repeated heads); ``enabled=False`` switches back to
    ``"sdpa"``. Only a model running ``"sdpa"`` is switched: eager and flash attention stay as they
    are. Returns True when the model's attention changed.
    """
    current = _compat.attention_implementation(model)
    target = _compat.register_grouped_sdpa() if enabled else "sdpa"
    if current == target:
        return False
    if current not in ("sdpa", _compat.GROUPED_SDPA):
        raise ValueError(
            f"grouped_sdpa replaces transformers' 'sdpa' attention; this model runs {current!r}, "
            "which it leaves alone. Load the model with attn_implementation='sdpa' to use it"
        )
    _compat.set_attention_implementation(model, target)
    return True


def __getattr__(name: str) -> Any:
    """``SUPPORTED_MODEL_TYPES``: deprecated; support is found by capability, not by model type."""
    if name == "SUPPORTED_MODEL_TYPES":
        warnings.warn(
            "peftkit.methods.prefix.SUPPORTED_MODEL_TYPES is deprecated: prefix-tuning works on any "
            "transformers model whose body takes a KV cache (docs/coverage.md); apply_prefix "
            "raises UnsupportedModelError with the reason otherwise",
            DeprecationWarning,
            stacklevel=2,
        )
        return ("gpt2", "llama", "mistral", "qwen2", "qwen3", "bert")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _init_from_tokens(body: nn.Module, table: PrefixTable, ids: Sequence[int]) -> None:
    """Set ``table`` to the keys/values ``body`` computes for ``ids`` (as seen by the current model)."""
    device = next(body.parameters()).device
    cache = _compat.new_dynamic_cache(getattr(body, "config", None))
    ids_tensor = torch.tensor([list(ids)], device=device)
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            body(input_ids=ids_tensor, **{_compat.cache_argument(body): cache})
    finally:
        body.train(was_training)
    n = len(ids)
    pairs = _compat.cached_keys_values(cache)
    if len(pairs) != table.shape.layers:
        raise UnsupportedModelError(
            f"init_token_ids: {type(body).__name__} cached {len(pairs)} of {table.shape.layers} "
            "layers' keys/values; initialise the prefix randomly (init_token_ids=None)"
        )
    table.load(torch.stack([torch.stack([k[0, :, -n:], v[0, :, -n:]]) for k, v in pairs]))


def apply_prefix(
    model: nn.Module,
    config: PrefixConfig | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Add prefix-tuning to ``model`` in place and return it: ``apply_prefix(model, prefix_length=16)``.

    Takes a ``PrefixConfig`` or its fields as keywords. The base is frozen; only the prefix trains.
    """
    return apply_with(PrefixConfig, model, config, adapter_name, fields)


def fold_prefix(model: nn.Module, adapter_names: Sequence[str] | None = None) -> list[str]:
    """Replace each prefix adapter's MLP by the plain keys/values it computes; returns the names folded.

    Outputs are unchanged (bit for bit). Call it when training ends: inference then carries no MLP.
    Folding makes new parameters, so an optimiser built before it no longer updates the prefix.
    """
    found = adapters(model)
    names = list(adapter_names) if adapter_names is not None else list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; the model has {list(found)}")
    folded = []
    for name in names:
        method = found[name]
        if isinstance(method, Prefix) and method.fold():
            folded.append(name)
    return folded
