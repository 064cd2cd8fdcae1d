"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., ICLR 2023).

Each wrapped weight W (out × in) learns W' = W + s · P diag(λ ⊙ m) Q (P: out × r, λ, m: r, Q: r × in,
s = alpha / init_r). The rank allocator (``on_step_end``) scores every triplet (Pᵢ, λᵢ, Qᵢ) and keeps
the best b(t) over all layers in the mask m, b(t) shrinking on a cubic schedule; ``regularizer``
is the orthogonality penalty on P and Q. See docs/methods/adalora.md.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from .._state import adapters
from ..config import (
    TargetedConfig,
    TrainDefaults,
    check_finite_number,
    check_positive_int,
    check_probability,
)
from ..layers import AdapterLayer, cast_like, has_call_hooks
from ..registry import register_method
from ..targeting import is_conv1d, linear_features
from .base import MergeReport, SwapMethod, apply_with

_FACTORS = ("P", "lam", "Q")


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA settings. Steps count optimiser steps; ``step_hooks(model, step)`` gets 0 for the first.

    total_steps: length of the run (T), needed by the budget schedule.
    init_r / target_r: rank per layer at the start / on average at the end (budget b(T) =
        target_r × layers).  alpha: scale numerator (s = alpha / init_r, fixed while ranks shrink).
    dropout: dropout on the adapter path's input (0 adds no op).
    t_init: warm-up steps at the full budget.  t_final: last steps with the final mask fixed.
    delta_t: steps between two maskings while the budget shrinks. Each left None (the default) is
        a fraction of the run: t_init T/8, t_final T/4, delta_t T/20 (at least 1), rounded down
        (``warmup_steps``, ``final_steps``, ``mask_every`` give the steps used).
    beta1 / beta2: EMA factors of sensitivity and uncertainty, in (0, 1).
    orth_reg_weight: weight of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (mean over layers) in ``regularizer``.
    """

    total_steps: int
    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    t_init: int | None = None
    t_final: int | None = None
    delta_t: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    # λ starts at zero and each triplet's update is λᵢ pᵢ qᵢᵀ with unit-norm pᵢ, qᵢ: at LoRA's lr
    # it grows far slower than B A does (SST-2, MiniLM, 200 steps: 78.6% at 1e-3, 82.2% at 5e-3).
    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=5e-3, why="lambda starts at zero and scales unit-norm P, Q columns: 5x LoRA's rate"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("total_steps", "init_r", "target_r"):
            check_positive_int(name, getattr(self, name))
        if self.delta_t is not None:
            check_positive_int("delta_t", self.delta_t)
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} exceeds init_r={self.init_r}: AdaLoRA only prunes; "
                "raise init_r or lower target_r"
            )
        for name in ("t_init", "t_final"):
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
            if value is not None and bad:
                raise ValueError(
                    f"{name} must be a non-negative number of steps (or None: a fraction of "
                    f"total_steps), got {value!r}"
                )
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise ValueError(
                f"t_init + t_final = {self.warmup_steps + self.final_steps} leaves no steps to "
                "shrink the "
                f"budget in total_steps={self.total_steps}; lower t_init / t_final or raise "
                "total_steps"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_finite_number(name, value)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), e.g. 0.85, got {value!r}")
        check_finite_number("alpha", self.alpha, positive=True)
        check_probability("dropout", self.dropout)
        check_finite_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")

    @property
    def warmup_steps(self) -> int:
        """t_init in steps: as given, or total_steps // 8."""
        return self.total_steps // 8 if self.t_init is None else self.t_init

    @property
    def final_steps(self) -> int:
        """t_final in steps: as given, or total_steps // 4."""
        return self.total_steps // 4 if self.t_final is None else self.t_final

    @property
    def mask_every(self) -> int:
        """delta_t in steps: as given, or max(1, total_steps // 20)."""
        return max(1, self.total_steps // 20) if self.delta_t is None else self.delta_t

    def budget_at(self, t: int, b0: int, b_final: int) -> int:
        """Live triplets allowed after ``t`` completed steps (paper eq. 12), from b0 down to b_final.

        b0 for t ≤ t_init; b_final + (b0 − b_final)(1 − (t − t_init) / (T − t_init − t_final))³
        (rounded down) until T − t_final; b_final from then on.
        """
        start, end = self.warmup_steps, self.total_steps - self.final_steps
        if t <= start:
            return b0
        if t >= end:
            return b_final
        left = 1.0 - (t - start) / (end - start)
        return int(b_final + (b0 - b_final) * left**3)


class AdaLoraLayer(AdapterLayer):
    """y = base(x) + s · ((dropout(x) Qᵀ) diag(λ ⊙ m)) Pᵀ;  x: (..., in), y: (..., out).

    P: (out, r), λ: (r,), Q: (r, in), m: (r,) mask buffer. Forward uses only the live triplets
    (gathered when some are pruned), so its cost follows the live rank. Also wraps transformers' Conv1D, whose
    weight is stored (in, out): ``delta_weight`` returns the update in the base weight's own layout.
    ``backward_passes`` counts backward passes that reached λ (to catch a forgotten allocator).
    """

    additive = True
    mergeable = True
    weight_independent = True  # s·BA does not read W: unmerge subtracts it, no copy kept

    def __init__(
        self,
        base: nn.Module,
        adapter_name: str,
        path: str,
        *,
        r: int,
        scaling: float,
        dropout: float,
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__(base, adapter_name, path)
        self.r = r
        self.scaling = scaling
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_f, out_f = linear_features(self.base_layer())  # logical, even for a packed weight
        kw = self.factor_placement(adapter_dtype)
        device, dtype = kw["device"], kw["dtype"]
        self.P = nn.Parameter(torch.randn(out_f, r, device=device, dtype=dtype) / math.sqrt(out_f))
        self.lam = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.randn(r, in_f, device=device, dtype=dtype) / math.sqrt(in_f))
        self.register_buffer("mask", torch.ones(r, device=device, dtype=dtype))
        # Indices of the live triplets (derived from mask): forward computes with these only.
        self.register_buffer("live", torch.arange(r, device=device), persistent=False)
        self.plain_linear = type(base) is nn.Linear  # exactly: not a subclass, not another wrapper
        self.backward_passes = 0
        self._watch_backward()

    def _watch_backward(self) -> None:
        # A gradient-accumulation hook on λ, not a counter in forward: forward stays untouched and
        # torch.compile sees no Python state change. Re-registered on unpickling / deepcopy.
        self.lam.register_post_accumulate_grad_hook(self._count_backward)

    def _count_backward(self, _: torch.Tensor) -> None:
        self.backward_passes += 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._watch_backward()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.live = self.mask.nonzero().squeeze(1)  # a loaded mask brings its live set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.live.numel()
        if not self.enabled or rank == 0:
            return self.base(x)  # type: ignore[no-any-return]
        q: torch.Tensor = self.Q
        scaled_p = self.P * self.lam  # (out, r) = P diag(λ); P Λ Q is never formed
        if rank < self.r:  # pruned: gather the live triplets, so compute shrinks with the rank
            q, scaled_p = q.index_select(0, self.live), scaled_p.index_select(1, self.live)
        if self._writes_into_base_output():
            # nn.Linear's own computation on 2-D views; the update is added into its fresh output
            # in place: one GEMM with beta=1 and no second (tokens × out) tensor.
            flat, linear = x.reshape(-1, x.shape[-1]), cast(nn.Linear, self.base)
            y = F.linear(flat, linear.weight, linear.bias)
            h = F.linear(self.dropout(flat), cast_like(q, flat)).to(y.dtype)  # (tokens, rank)
            y.addmm_(h, scaled_p.t().to(y.dtype), alpha=self.scaling)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = self.base(x)
        h = F.linear(self.dropout(x), cast_like(q, x))  # (..., rank): the only activation added
        out = torch.addmm(
            y.reshape(-1, y.shape[-1]),
            cast_like(h.reshape(-1, rank), y),
            cast_like(scaled_p.t(), y),
            alpha=self.scaling,
        )
        return out.view(y.shape)

    def _writes_into_base_output(self) -> bool:
        """Whether forward may compute the base itself and add in place: the base is a plain
        nn.Linear and no hook is registered (a forward hook could keep or change its output; any
        hook would be skipped, since the base is not called)."""
        return self.plain_linear and not has_call_hooks(self.base)

    def delta_weight(self) -> torch.Tensor:
        live = (self.lam * self.mask).float()
        delta: torch.Tensor = (self.P.float() * live) @ self.Q.float() * self.scaling
        return delta.t() if is_conv1d(self.base_layer()) else delta

    # -- live triplets -----------------------------------------------------------------------
    def live_rank(self) -> int:
        return int(self.live.numel())

    def set_mask(self, mask: torch.Tensor) -> None:
        """Keep the triplets where ``mask`` is 1; pruned λ are zeroed (the paper's truncation)."""
        with torch.no_grad():
            self.mask.copy_(mask)
            self.lam.mul_(self.mask)
            self.live = self.mask.nonzero().squeeze(1)

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """P, λ, Q restricted to live triplets (the live tensors themselves when none is pruned)."""
        if self.live_rank() == self.r:
            return {"P": self.P, "lam": self.lam, "Q": self.Q}
        keep = self.live
        return {"P": self.P[:, keep], "lam": self.lam[keep], "Q": self.Q[keep]}

    def load_live(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors shaped like ``live_tensors()`` into the live triplets."""
        keep = self.live
        with torch.no_grad():
            self.P.index_copy_(1, keep, tensors["P"].to(self.P))
            self.lam.index_copy_(0, keep, tensors["lam"].to(self.lam))
            self.Q.index_copy_(0, keep, tensors["Q"].to(self.Q))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.live_rank()}/{self.r}, scaling={self.scaling:g}"


def orthogonality_penalty(ps: Sequence[torch.Tensor], qs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F;  P: (out, r), Q: (r, in).

    Same-shaped factors are stacked into one batched product: a few kernels per distinct shape
    instead of nine per layer.
    """
    terms = []
    for factors, rows in ((ps, False), (qs, True)):
        groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for factor in factors:
            groups[tuple(factor.shape)].append(factor)
        terms += [_gram_penalty(group, rows=rows) for group in groups.values()]
    return torch.stack(terms).sum()


def _gram_penalty(same: list[torch.Tensor], *, rows: bool) -> torch.Tensor:
    stacked = torch.stack(same)  # (layers, a, b)
    other = stacked.transpose(1, 2)
    gram = stacked @ other if rows else other @ stacked
    gram.diagonal(dim1=1, dim2=2).sub_(1.0)  # in place: bmm's backward needs its inputs only
    return gram.square().sum()


class Importance:
    """Smoothed importance of every entry of some layers' (P, λ, Q) triplets (paper eq. 8–11).

    Per entry w: I = |w · ∂L/∂w|, Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2) |I − Ī|, score Ī · Ū.
    A triplet's score: score(λᵢ) + mean score of P's column i + mean score of Q's row i.
    State is allocated once; ``update`` works in place with fused multi-tensor ops.
    """

    def __init__(
        self, factors: Sequence[Sequence[torch.Tensor]], beta1: float, beta2: float
    ) -> None:
        self.params = [t for triplet in factors for t in triplet]
        self.sens = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.unc = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.scratch = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.w1, self.w2 = 1.0 - beta1, 1.0 - beta2

    def fits(self, factors: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether the state still belongs to these tensors (e.g. not after ``model.to(device)``)."""
        flat = [t for triplet in factors for t in triplet]
        return len(flat) == len(self.params) and all(
            a is b and a.device == s.device and a.dtype == s.dtype
            for a, b, s in zip(flat, self.params, self.sens, strict=True)
        )

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients in. Entries without a gradient keep their state."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            self._update(self.params, grads, self.scratch, self.sens, self.unc)
            return
        pick = [i for i, g in enumerate(grads) if g is not None]  # backward missed some layers
        lists = (self.params, grads, self.scratch, self.sens, self.unc)
        if pick:
            self._update(*([lst[i] for i in pick] for lst in lists))

    def _update(self, params: Any, grads: Any, scratch: Any, sens: Any, unc: Any) -> None:
        torch._foreach_copy_(scratch, params)
        torch._foreach_mul_(scratch, grads)
        torch._foreach_abs_(scratch)  # I
        torch._foreach_lerp_(sens, scratch, self.w1)  # Ī
        torch._foreach_sub_(scratch, sens)
        torch._foreach_abs_(scratch)  # |I − Ī|
        torch._foreach_lerp_(unc, scratch, self.w2)  # Ū

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """Scores of all triplets, layer after layer (float32, length Σ r)."""
        scores = [(s * u).float() for s, u in zip(self.sens, self.unc, strict=True)]
        per_layer = [
            lam + p.mean(0) + q.mean(1)
            for p, lam, q in zip(scores[0::3], scores[1::3], scores[2::3], strict=True)
        ]
        return torch.cat(per_layer)


@register_method("adalora", AdaLoraConfig)
class AdaLora(SwapMethod):
    """SVD-form low-rank updates whose ranks the allocator prunes to a global budget."""

    supported = (nn.Linear,)
    config: AdaLoraConfig

    @classmethod
    def demo_config(cls, total_steps: int) -> AdaLoraConfig:
        """Rank 8 → 4 on average, on the default schedule: warm-up for 1/8 of the run, masking
        every 1/20, last quarter fixed."""
        return AdaLoraConfig(init_r=8, target_r=4, total_steps=total_steps)

    def __init__(self, config: AdaLoraConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.saved_ranks: dict[str, int] = {}  # ranks to build at, from a checkpoint
        self.last_step: int | None = None  # last step the allocator saw; None: it never ran
        self.last_masked = config.warmup_steps  # step count at the last masking
        self.masked = False  # a mask has been applied (ranks may be pruned)
        self.frozen = False  # ranks are final: the final mask, or loaded from a pruned checkpoint
        self.resumed_mid_schedule = False  # loaded from a checkpoint saved while pruning
        self._importance: Importance | None = None

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        cfg = self.config
        rank = self.saved_ranks.get(path, cfg.init_r)
        scaling = cfg.alpha / cfg.init_r
        return AdaLoraLayer(
            module,
            self.adapter_name,
            path,
            r=rank,
            scaling=scaling,
            dropout=cfg.dropout,
            adapter_dtype=cfg.adapter_dtype,
        )

    def svd_layers(self) -> list[AdaLoraLayer]:
        return [layer for layer in self.layers if isinstance(layer, AdaLoraLayer)]

    @property
    def initial_budget(self) -> int:
        return self.config.init_r * len(self.svd_layers())

    @property
    def final_budget(self) -> int:
        return self.config.target_r * len(self.svd_layers())

    def rank_pattern(self) -> dict[str, int]:
        """Live rank of each layer, keyed by module path."""
        return {layer.path: layer.live_rank() for layer in self.svd_layers()}

    # -- training hooks ----------------------------------------------------------------------
    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight · mean over layers of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F."""
        layers = [layer for layer in self.svd_layers() if layer.r > 0]
        if self.config.orth_reg_weight == 0 or not layers:
            return None
        penalty = orthogonality_penalty([la.P for la in layers], [la.Q for la in layers])
        return penalty * (self.config.orth_reg_weight / len(layers))

    def planned_steps(self) -> int:
        """The budget schedule runs over ``total_steps`` optimiser steps."""
        return self.config.total_steps

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Update importance; on the schedule, mask to the budget b(step + 1). Then zero-cost."""
        self.last_step = step
        if self.frozen:
            if self.resumed_mid_schedule:
                self._warn_schedule_not_resumed()
            return
        if self.initial_budget == self.final_budget:
            return  # nothing to prune (target_r == init_r)
        self._tracker().update()
        t, cfg = step + 1, self.config
        if t >= cfg.total_steps - cfg.final_steps:
            self._mask_to(self.final_budget)
            self.frozen, self._importance = True, None  # the final mask; free the EMA state
        elif t > cfg.warmup_steps and t - self.last_masked >= cfg.mask_every:
            self._mask_to(cfg.budget_at(t, self.initial_budget, self.final_budget))
            self.last_masked = t

    def _warn_schedule_not_resumed(self) -> None:
        self.resumed_mid_schedule = False  # once
        warnings.warn(
            f"AdaLoRA adapter {self.adapter_name!r} was loaded from a checkpoint saved before its "
            "rank schedule finished; its ranks stay as loaded (the schedule does not resume from "
            "a checkpoint)",
            UserWarning,
            stacklevel=4,
        )

    def _tracker(self) -> Importance:
        factors = [(layer.P, layer.lam, layer.Q) for layer in self.svd_layers()]
        if self._importance is None or not self._importance.fits(factors):
            self._importance = Importance(factors, self.config.beta1, self.config.beta2)
        return self._importance

    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets over all layers; mask the rest."""
        layers = self.svd_layers()
        scores = self._tracker().triplet_scores()
        keep = torch.zeros_like(scores)
        keep[torch.topk(scores, min(budget, scores.numel()), sorted=False).indices] = 1.0
        for layer, mask in zip(layers, keep.split([layer.r for layer in layers]), strict=True):
            layer.set_mask(mask)
        self.masked = True

    def check_allocator_ran(self, action: str) -> None:
        """Refuse ``action`` when training went past t_init but the rank allocator never ran."""
        if self.frozen or self.last_step is not None or self.initial_budget == self.final_budget:
            return
        passes = max((layer.backward_passes for layer in self.svd_layers()), default=0)
        if passes > self.config.warmup_steps:
            raise RuntimeError(
                f"cannot {action} AdaLoRA adapter {self.adapter_name!r}: {passes} backward passes "
                f"ran (t_init={self.config.warmup_steps}) but its rank allocator never did, so every "
                f"layer still has rank init_r={self.config.init_r}. Call "
                "peftkit.step_hooks(model, step) after optimizer.step() and before "
                "optimizer.zero_grad() in your loop (peftkit's Trainer does this), then train again"
            )

    def describe(self) -> dict[str, Any]:
        ranks = [layer.live_rank() for layer in self.svd_layers()] or [0]
        spread = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
        return {"rank": spread, "budget": f"{sum(ranks)} (target {self.final_budget})"}

    # -- merging and checkpoints -------------------------------------------------------------
    def check_merge(self) -> None:
        self.check_allocator_ran("merge")

    def merge(self, model: nn.Module, *, unload: bool) -> MergeReport:
        self.check_allocator_ran("merge")
        return super().merge(model, unload=unload)

    def before_save(self, model: nn.Module) -> None:
        self.check_allocator_ran("save")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Live triplets only (pruned ones are dropped), plus saved modules' tensors."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            named = layer.live_tensors() if isinstance(layer, AdaLoraLayer) else None
            for name, tensor in (named or dict(layer.named_adapter_tensors())).items():
                out[f"{layer.path}.{name}"] = tensor
        return out

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Write live triplets into the layers (built at the saved ranks); the rest as usual."""
        rest = dict(tensors)
        for layer in self.svd_layers():
            keys = {leaf: f"{layer.path}.{leaf}" for leaf in _FACTORS}
            if all(key in rest for key in keys.values()):
                layer.load_live({leaf: rest.pop(key) for leaf, key in keys.items()})
        super().load_state_dict(model, rest)

    def extra_state(self) -> dict[str, Any]:
        return {"rank_pattern": self.rank_pattern(), "masked": self.masked, "final": self.frozen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        ranks, masked, final = (
            state.get("rank_pattern", {}),
            state.get("masked", False),
            state.get("final", False),
        )
        bad_rank = not isinstance(ranks, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= self.config.init_r
            for v in ranks.values()
        )
        if bad_rank or not isinstance(masked, bool) or not isinstance(final, bool):
            raise ValueError(
                f"AdaLoRA adapter {self.adapter_name!r}: its saved state must hold rank_pattern "
                f"(module paths to ranks from 0 to init_r={self.config.init_r}), masked and "
                f"final (true or false); got {state!r:.120}. Fix the file, or re-save the adapter"
            )
        self.saved_ranks = {str(k): v for k, v in ranks.items()}
        self.masked = masked
        # A pruned checkpoint keeps its ranks: the importance state behind them was not saved.
        self.frozen = self.masked
        self.resumed_mid_schedule = self.masked and not final


def rank_pattern(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Live rank of every layer of the model's AdaLoRA adapter (or the named one), by module path."""
    found = {n: m for n, m in adapters(model).items() if isinstance(m, AdaLora)}
    if adapter_name is not None:
        if adapter_name not in found:
            raise KeyError(
                f"no AdaLoRA adapter named {adapter_name!r}; AdaLoRA ones: {list(found)}"
            )
        return found[adapter_name].rank_pattern()
    if len(found) != 1:
        what = "no AdaLoRA adapter" if not found else f"several AdaLoRA adapters {list(found)}"
        raise ValueError(f"the model has {what}; pass adapter_name= or apply_adalora(model, ...)")
    return next(iter(found.values())).rank_pattern()


def apply_adalora(
    model: nn.Module,
    config: AdaLoraConfig | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Add AdaLoRA to ``model`` in place: ``apply_adalora(model, total_steps=1000, init_r=12)``.

    Call ``peftkit.regularizer(model)`` (add it to the loss) and ``peftkit.step_hooks(model, step)``
    (after optimizer.step()) in your loop, or use peftkit's Trainer, which does both.
    """
    return apply_with(AdaLoraConfig, model, config, adapter_name, fields)
