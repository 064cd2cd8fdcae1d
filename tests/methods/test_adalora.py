"""AdaLoRA numerics: schedule, importance, allocation, regulariser, checkpoints, the forgotten hook."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit import AdaLoraConfig, apply_adalora, rank_pattern
from peftkit.methods.adalora import AdaLora, AdaLoraLayer, Importance, orthogonality_penalty

from helpers import OutputShapes, perturb
from zoo import CASES, TinyTransformer

ROOT = Path(__file__).resolve().parents[2]


class Pair(nn.Module):
    """Two linear layers whose outputs count with different weights in the output."""

    def __init__(self, weight_a: float = 1.0, weight_b: float = 1.0, dim: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.weights = (weight_a, weight_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights[0] * self.a(x) + self.weights[1] * self.b(x)


def _method(model: nn.Module, name: str = "default") -> AdaLora:
    method = peftkit.adapters(model)[name]
    assert isinstance(method, AdaLora)
    return method


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(50, (4, 8), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, steps: int, *, hooks: bool = True, lr: float = 1e-2) -> None:
    """A hand-written loop on the tiny transformer (or anything taking ids): the three hook lines."""
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        out = model(_ids(step))
        loss = out.float().pow(2).mean()
        reg = peftkit.regularizer(model)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        if hooks:
            peftkit.step_hooks(model, step)
        opt.zero_grad(set_to_none=True)
    model.eval()


def _synthetic_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in peftkit.trainable_parameters(model):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _hooks_only(model: nn.Module, steps: range) -> None:
    """Drive the allocator with random gradients: the schedule without forward/backward cost."""
    for step in steps:
        _synthetic_grads(model, step)
        peftkit.step_hooks(model, step)


def _live_lambdas(model: nn.Module) -> int:
    return sum(
        int(torch.count_nonzero(layer.lam * layer.mask)) for layer in _method(model).svd_layers()
    )


# -- schedule ------------------------------------------------------------------------------------
def test_budget_schedule_equals_the_closed_form() -> None:
    cfg = AdaLoraConfig(total_steps=110, t_init=10, t_final=20)
    b0, bt = 48, 24
    for t in (0, 5, 10):
        assert cfg.budget_at(t, b0, bt) == 48
    # b(t) = bT + (b0 - bT) (1 - (t - 10) / 80)^3, rounded down
    assert cfg.budget_at(30, b0, bt) == 34  # 24 + 24 * 0.75^3 = 34.125
    assert cfg.budget_at(50, b0, bt) == 27  # 24 + 24 * 0.5^3 = 27
    assert cfg.budget_at(70, b0, bt) == 24  # 24 + 24 * 0.25^3 = 24.375
    assert cfg.budget_at(11, b0, bt) == 47  # 24 + 24 * (79/80)^3 = 47.11
    for t in (90, 100, 110, 500):
        assert cfg.budget_at(t, b0, bt) == 24


def test_masks_follow_the_schedule_and_freeze_at_the_end() -> None:
    model = TinyTransformer()
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_steps=12, t_init=2, t_final=2, delta_t=2)
    apply_adalora(model, cfg)
    perturb(model)
    method = _method(model)
    b0, bt = method.initial_budget, method.final_budget
    assert (b0, bt) == (48, 24)
    seen = []
    for step in range(12):
        _synthetic_grads(model, step)
        peftkit.step_hooks(model, step)
        seen.append(sum(rank_pattern(model).values()))
    expected, live = [], b0
    for t in range(1, 13):
        if t in (4, 6, 8):  # t_init + k * delta_t, before T - t_final
            live = cfg.budget_at(t, b0, bt)
        if t >= 10:
            live = bt
        expected.append(live)
    assert expected == [48, 48, 48, 34, 34, 27, 27, 24, 24, 24, 24, 24]
    assert seen == expected
    assert method.frozen and method._importance is None  # final phase: no per-step work left


def test_schedule_left_unset_is_a_fraction_of_the_run() -> None:
    """t_init / t_final / delta_t None: T/8, T/4, T/20 (rounded down, delta_t at least 1), the same
    masks as those steps given explicitly; an explicit value (0 included) wins."""
    cfg = AdaLoraConfig(total_steps=200)
    assert (cfg.warmup_steps, cfg.final_steps, cfg.mask_every) == (25, 50, 10)
    assert (cfg.t_init, cfg.t_final, cfg.delta_t) == (None, None, None)  # the fields stay unset
    tiny = AdaLoraConfig(total_steps=7)
    assert (tiny.warmup_steps, tiny.final_steps, tiny.mask_every) == (0, 1, 1)
    given = AdaLoraConfig(total_steps=200, t_init=0, t_final=0, delta_t=3)
    assert (given.warmup_steps, given.final_steps, given.mask_every) == (0, 0, 3)
    ranks = []
    for fields in ({}, {"t_init": 5, "t_final": 10, "delta_t": 2}):
        torch.manual_seed(0)
        model = TinyTransformer()
        apply_adalora(model, init_r=4, target_r=2, total_steps=40, **fields)  # type: ignore[arg-type]
        seen = []
        for step in range(40):
            _synthetic_grads(model, step)
            peftkit.step_hooks(model, step)
            seen.append(sum(rank_pattern(model).values()))
        ranks.append(seen)
    assert ranks[0] == ranks[1]
    assert ranks[0][4] == 48 and ranks[0][6] < 48 and ranks[0][29] == 24  # warm-up, shrink, final


def test_after_total_steps_exactly_the_target_budget_of_lambdas_is_nonzero() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adalora(model, init_r=6, target_r=3, total_steps=8, t_init=1, t_final=2, delta_t=2)
    _train(model, 8)
    method = _method(model)
    assert _live_lambdas(model) == method.final_budget == 3 * 12
    assert sum(rank_pattern(model).values()) == 36
    assert len(set(rank_pattern(model).values())) > 1, "the allocation should not be uniform"


# -- importance ----------------------------------------------------------------------------------
def test_importance_ema_and_triplet_scores_by_hand() -> None:
    p = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # P: out 2 x r 2
    lam = torch.tensor([2.0, -1.0])
    q = torch.tensor([[1.0, 1.0, -1.0], [0.0, 2.0, 1.0]])  # Q: r 2 x in 3
    imp = Importance([(p, lam, q)], beta1=0.5, beta2=0.75)
    p.grad, lam.grad, q.grad = torch.ones(2, 2), torch.tensor([1.0, 4.0]), torch.ones(2, 3)
    imp.update()
    # I = |w g|; Ī = 0.5 * I; Ū = 0.25 * |I - Ī| = 0.125 * I; score = Ī Ū = I^2 / 16
    lam_i = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(imp.sens[1], 0.5 * lam_i)
    torch.testing.assert_close(imp.unc[1], 0.125 * lam_i)
    lam.grad = torch.tensor([0.0, 1.0])  # second step: I_lam = (0, 1)
    imp.update()
    sens = 0.5 * (0.5 * lam_i) + 0.5 * torch.tensor([0.0, 1.0])  # (0.5, 1.5)
    unc = 0.75 * (0.125 * lam_i) + 0.25 * (torch.tensor([0.0, 1.0]) - sens).abs()  # (0.3125, 0.5)
    torch.testing.assert_close(imp.sens[1], sens)
    torch.testing.assert_close(imp.unc[1], unc)
    # P and Q had the same gradient twice: Ī = 0.75 I, Ū = 0.75 * 0.125 I + 0.25 * 0.25 I = 0.15625 I
    p_score = (0.75 * 0.15625) * (p * 1.0).abs() ** 2
    q_score = (0.75 * 0.15625) * q.abs() ** 2
    expected = sens * unc + p_score.mean(0) + q_score.mean(1)
    torch.testing.assert_close(imp.triplet_scores(), expected)


def test_importance_keeps_state_of_tensors_without_gradient() -> None:
    a, b = torch.ones(2, 1), torch.ones(1)
    c = torch.ones(1, 2)
    imp = Importance([(a, b, c)], beta1=0.5, beta2=0.5)
    a.grad = torch.full((2, 1), 2.0)  # b and c got no gradient (say, the backward missed them)
    imp.update()
    torch.testing.assert_close(imp.sens[0], torch.ones(2, 1))
    assert not imp.sens[1].any() and not imp.sens[2].any()


def test_allocator_moves_budget_to_the_layer_that_matters_more() -> None:
    torch.manual_seed(0)
    model = Pair(weight_a=10.0, weight_b=0.1)
    apply_adalora(
        model, targets=["a", "b"], init_r=4, target_r=2, total_steps=20, t_init=4, delta_t=2
    )
    x = torch.randn(32, 16)
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    for step in range(20):
        (model(x) - 1.0).pow(2).mean().backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad()
    assert rank_pattern(model) == {"a": 4, "b": 0}


# -- the SVD layer -------------------------------------------------------------------------------
def test_initial_state_zero_lambda_gaussian_factors_and_identity_output() -> None:
    torch.manual_seed(0)
    model = Pair(dim=256)
    x = torch.randn(3, 256)
    before = model(x)
    apply_adalora(model, targets=["a"], init_r=8, total_steps=10)
    layer = model.a
    assert isinstance(layer, AdaLoraLayer)
    assert not layer.lam.any() and layer.mask.eq(1).all()
    assert layer.P.shape == (256, 8) and layer.Q.shape == (8, 256)
    # unit expected column / row norms: the orthogonality penalty starts small
    assert layer.P.norm(dim=0).mean().item() == pytest.approx(1.0, abs=0.1)
    assert layer.Q.norm(dim=1).mean().item() == pytest.approx(1.0, abs=0.1)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_forward_and_delta_weight_match_the_definition_with_a_mask() -> None:
    torch.manual_seed(0)
    model = Pair()
    apply_adalora(model, targets=["a"], init_r=4, target_r=2, alpha=6, total_steps=10)
    perturb(model, scale=0.5)
    layer = model.a
    layer.set_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert layer.live_rank() == 2 and layer.lam[1] == 0 and layer.lam[3] == 0
    delta = 1.5 * layer.P @ torch.diag(layer.lam * layer.mask) @ layer.Q  # s = 6 / 4
    torch.testing.assert_close(layer.delta_weight(), delta)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.t(), rtol=1e-5, atol=1e-6)


def test_forward_and_backward_never_form_the_full_update() -> None:
    model = nn.Sequential(nn.Linear(48, 40))
    apply_adalora(model, targets=["0"], init_r=4, target_r=4, total_steps=10)
    perturb(model)
    x = torch.randn(3, 48, requires_grad=True)
    with OutputShapes() as seen:
        model(x).sum().backward()
    assert (40, 48) not in seen.shapes and (48, 40) not in seen.shapes
    assert (3, 4) in seen.shapes  # the rank-r intermediate


def test_pruned_layers_compute_with_live_triplets_only() -> None:
    model = nn.Sequential(nn.Linear(48, 40))
    apply_adalora(model, targets=["0"], init_r=6, target_r=2, total_steps=10)
    perturb(model)
    layer = model[0]
    x = torch.randn(3, 48)
    with torch.no_grad():
        full = layer(x)
        masked_lam = layer.lam * torch.tensor([1.0, 0, 0, 1, 0, 1])
        expected = layer.base(x) + layer.scaling * x @ (layer.P * masked_lam @ layer.Q).t()
    layer.set_mask(torch.tensor([1.0, 0, 0, 1, 0, 1]))
    assert layer.live.tolist() == [0, 3, 5]
    with OutputShapes() as seen, torch.no_grad():
        pruned = layer(x)
    assert (3, 3) in seen.shapes and (3, 6) not in seen.shapes  # the intermediate has rank 3
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pruned, full)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin = nn.Sequential(nn.Linear(48, 40))
    twin.load_state_dict({k: v for k, v in state.items() if k.startswith("0.base.")}, strict=False)
    apply_adalora(twin, targets=["0"], init_r=6, target_r=2, total_steps=10)
    twin.load_state_dict(state)  # a plain torch state dict carries the mask, and the live set
    assert twin[0].live.tolist() == [0, 3, 5]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), pruned, rtol=0, atol=0)


def _outputs_and_grads(
    model: nn.Module, x: torch.Tensor, hook: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (input, P, λ, Q), optionally with a forward hook on the base."""
    layer = model[0]
    handle = layer.base.register_forward_hook(lambda m, i, o: None) if hook else None
    x = x.clone().requires_grad_(x.is_floating_point())
    out = model(x)
    out.square().sum().backward()
    grads = [x.grad, layer.P.grad, layer.lam.grad, layer.Q.grad]
    for p in (layer.P, layer.lam, layer.Q):
        p.grad = None
    if handle is not None:
        handle.remove()
    return out.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 5, 12), (2, 3, 5, 12)])
def test_in_place_fast_path_equals_the_plain_path(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7, bias=bias))
    apply_adalora(model, targets=["0"], init_r=4, target_r=2, total_steps=10)
    perturb(model)
    x = torch.randn(*shape)
    assert model[0]._writes_into_base_output()
    for mask in (None, torch.tensor([1.0, 0.0, 1.0, 1.0])):
        if mask is not None:
            model[0].set_mask(mask)
        fast, fast_grads = _outputs_and_grads(model, x, hook=False)
        plain, plain_grads = _outputs_and_grads(model, x, hook=True)  # a hook forces the plain path
        torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
        for a, b in zip(fast_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_forward_hook_on_the_base_sees_the_base_output_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    apply_adalora(model, targets=["0"], init_r=4, target_r=2, total_steps=10)
    perturb(model)
    kept: list[torch.Tensor] = []
    model[0].base.register_forward_hook(lambda m, i, out: kept.append(out))
    assert not model[0]._writes_into_base_output()
    x = torch.randn(3, 12)
    adapted = model(x)
    torch.testing.assert_close(kept[0], model[0].base(x))
    assert not torch.allclose(kept[0], adapted)


def test_backward_hooks_on_the_base_still_run() -> None:
    # The fast path computes the linear itself instead of calling the base: its hooks must not
    # be skipped, whether the base's own or process-wide.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    apply_adalora(model, targets=["0"], init_r=4, target_r=2, total_steps=10)
    perturb(model)
    seen: list[torch.Tensor] = []
    handle = model[0].base.register_full_backward_hook(lambda m, gi, go: seen.append(go[0]))
    weights = torch.randn(3, 7)
    (model(torch.randn(3, 12, requires_grad=True)) * weights).sum().backward()
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], weights)
    base = model[0].base
    calls: list[nn.Module] = []
    hook = nn.modules.module.register_module_full_backward_pre_hook(
        lambda m, go: calls.append(m) if m is base else None
    )
    try:
        model(torch.randn(3, 12, requires_grad=True)).sum().backward()
    finally:
        hook.remove()
    assert calls == [base]


def test_fast_path_under_cpu_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    apply_adalora(model, targets=["0"], init_r=4, target_r=2, total_steps=10)
    perturb(model)
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.05)


def test_gpt2_conv1d_orientation_and_merge_after_pruning() -> None:
    case = CASES["gpt2"]
    model = case.build()
    apply_adalora(model, targets=["c_attn", "c_fc"], init_r=4, target_r=2, total_steps=4)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdaLoraLayer) and layer.P.shape == (96, 4) and layer.Q.shape == (4, 32)
    perturb(model)
    _synthetic_grads(model, 0)
    for step in range(4):
        peftkit.step_hooks(model, step)
    assert sum(rank_pattern(model).values()) == 8
    with torch.no_grad():
        expected = case.output(model)
        model, report = peftkit.merge_and_unload(model, report=True)
        torch.testing.assert_close(case.output(model), expected, rtol=1e-4, atol=1e-5)
    assert len(report.merged) == 4 and not peftkit.adapters(model)


def test_unsupported_layer_type_is_refused_with_a_fix() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(peftkit.TargetError, match="cannot wrap '0' \\(Embedding\\).*exclude"):
        apply_adalora(model, targets=["0"], total_steps=10)
    assert isinstance(model[0], nn.Embedding) and not peftkit.adapters(model)


# -- regulariser ---------------------------------------------------------------------------------
def test_orthogonality_penalty_by_hand() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # PᵀP - I = diag(0, 3) -> 9
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # QQᵀ - I = [[0, 1], [1, 0]] -> 2
    assert orthogonality_penalty([p], [q]).item() == pytest.approx(11.0)
    eye_p, eye_q = torch.eye(3)[:, :2], torch.eye(3)[:2]
    assert orthogonality_penalty([eye_p], [eye_q]).item() == 0.0
    # layers of different shapes, batched per shape: the sum of the per-layer values
    wide = torch.tensor([[2.0, 0.0, 0.0, 0.0]])  # Q (1, 4): QQᵀ - I = 3 -> 9; P (2, 1) = e1 -> 0
    total = orthogonality_penalty([p, eye_p, torch.tensor([[1.0], [0.0]])], [q, eye_q, wide])
    assert total.item() == pytest.approx(11.0 + 0.0 + 9.0)


def test_regularizer_is_weighted_mean_over_layers() -> None:
    model = Pair(dim=3)
    apply_adalora(
        model, targets=["a", "b"], init_r=2, target_r=1, total_steps=10, orth_reg_weight=0.5
    )
    with torch.no_grad():
        model.a.P.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
        model.a.Q.copy_(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))  # 11
        model.b.P.copy_(torch.eye(3)[:, :2])
        model.b.Q.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # 0 + 9
    reg = peftkit.regularizer(model)
    assert reg is not None and reg.item() == pytest.approx(0.5 * (11 + 9) / 2)
    reg.backward()
    assert model.a.P.grad is not None and model.a.lam.grad is None  # only P and Q are penalised
    off = Pair()
    apply_adalora(off, total_steps=10, orth_reg_weight=0.0)
    assert peftkit.regularizer(off) is None


def test_forward_adds_nothing_to_the_loss() -> None:
    model = TinyTransformer()
    expected = model(_ids())
    apply_adalora(model, total_steps=10)
    torch.testing.assert_close(model(_ids()), expected)  # the penalty lives in regularizer() only


# -- checkpoints ---------------------------------------------------------------------------------
def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyTransformer()


def _pruned_model() -> nn.Module:
    model = _base()
    apply_adalora(model, init_r=6, target_r=3, total_steps=10, t_init=2, t_final=2, delta_t=2)
    perturb(model, scale=0.3)
    _hooks_only(model, range(10))
    return model


def test_save_drops_pruned_triplets_and_load_rebuilds_at_live_ranks(tmp_path: Path) -> None:
    model = _pruned_model()
    ranks = rank_pattern(model)
    assert min(ranks.values()) < 6
    with torch.no_grad():
        expected = model(_ids(99))
    peftkit.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / peftkit.checkpoint.WEIGHTS_NAME), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    for path, r in ranks.items():
        out_f, in_f = model.get_submodule(path).base_weight().shape
        assert shapes[f"default.{path}.P"] == (out_f, r)
        assert shapes[f"default.{path}.lam"] == (r,)
        assert shapes[f"default.{path}.Q"] == (r, in_f)
    assert sum(shapes[f"default.{p}.lam"][0] for p in ranks) == 36
    fresh = peftkit.load_adapter(_base(), tmp_path)
    assert rank_pattern(fresh) == ranks
    assert all(layer.r == ranks[layer.path] for layer in _method(fresh).svd_layers())
    with torch.no_grad():
        # Training-time layers gather their live triplets, so both compute the very same products.
        torch.testing.assert_close(fresh(_ids(99)), expected, rtol=0, atol=0)
    assert _method(fresh).frozen


def test_merge_after_pruning_matches_and_leaves_a_plain_model() -> None:
    model = _pruned_model()
    with torch.no_grad():
        expected = model(_ids(99))
        peftkit.merge_and_unload(model)
        torch.testing.assert_close(model(_ids(99)), expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, AdaLoraLayer) for m in model.modules())


def test_checkpoint_saved_before_pruning_resumes_the_schedule(tmp_path: Path) -> None:
    model = TinyTransformer()
    apply_adalora(model, init_r=4, target_r=2, total_steps=10, t_init=5)
    _train(model, 3)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(_base(), tmp_path)
    assert not _method(fresh).frozen
    _train(fresh, 10)
    assert sum(rank_pattern(fresh).values()) == 24


def test_checkpoint_saved_mid_schedule_keeps_its_ranks_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adalora(model, init_r=4, target_r=2, total_steps=20, t_init=2, delta_t=2)
    perturb(model)
    _hooks_only(model, range(6))
    ranks = rank_pattern(model)
    assert 24 < sum(ranks.values()) < 48
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(_base(), tmp_path)
    with pytest.warns(UserWarning, match="does not resume"):
        _hooks_only(fresh, range(6, 9))
    assert rank_pattern(fresh) == ranks


# -- the forgotten hook --------------------------------------------------------------------------
def test_forgetting_the_hook_makes_save_and_merge_raise(tmp_path: Path) -> None:
    model = TinyTransformer()
    apply_adalora(model, init_r=4, target_r=2, total_steps=10, t_init=2)
    _train(model, 3, hooks=False)
    with pytest.raises(RuntimeError, match=r"3 backward passes.*t_init=2.*peftkit\.step_hooks"):
        peftkit.save_adapter(model, tmp_path)
    with pytest.raises(RuntimeError, match="cannot merge.*step_hooks"):
        peftkit.merge_and_unload(model)
    assert not (tmp_path / peftkit.checkpoint.WEIGHTS_NAME).exists()


def test_no_error_within_warmup_with_hooks_or_without_pruning(tmp_path: Path) -> None:
    warm = TinyTransformer()
    apply_adalora(warm, init_r=4, target_r=2, total_steps=10, t_init=3)
    _train(warm, 3, hooks=False)  # still within t_init: nothing to allocate yet
    peftkit.save_adapter(warm, tmp_path / "warm")
    hooked = TinyTransformer()
    apply_adalora(hooked, init_r=4, target_r=2, total_steps=10, t_init=2)
    _train(hooked, 3)
    peftkit.save_adapter(hooked, tmp_path / "hooked")
    fixed = TinyTransformer()
    apply_adalora(fixed, init_r=4, target_r=4, total_steps=10)
    _train(fixed, 3, hooks=False)
    peftkit.merge(fixed)


def test_backward_counter_survives_deepcopy() -> None:
    model = TinyTransformer()
    apply_adalora(model, init_r=4, target_r=2, total_steps=10)
    twin = copy.deepcopy(model)
    _train(twin, 2, hooks=False)
    assert max(layer.backward_passes for layer in _method(twin).svd_layers()) == 2
    assert max(layer.backward_passes for layer in _method(model).svd_layers()) == 0
    with pytest.raises(RuntimeError, match="never did"):
        peftkit.merge(twin)


# -- reporting -----------------------------------------------------------------------------------
def test_summary_and_rank_pattern_show_live_ranks() -> None:
    model = _pruned_model()
    details = peftkit.trainable_summary(model).adapters[0].details
    ranks = list(rank_pattern(model).values())
    assert details["rank"] == f"{min(ranks)}-{max(ranks)}"
    assert details["budget"] == "36 (target 36)"
    assert "adalora" in str(peftkit.trainable_summary(model))
    with pytest.raises(KeyError, match="no AdaLoRA adapter named 'x'"):
        rank_pattern(model, "x")
    plain = TinyTransformer()
    peftkit.apply_lora(plain)
    with pytest.raises(ValueError, match="no AdaLoRA adapter"):
        rank_pattern(plain)


def test_importance_state_follows_a_dtype_change() -> None:
    model = TinyTransformer()
    apply_adalora(model, init_r=4, target_r=2, total_steps=10, t_init=5)
    _hooks_only(model, range(2))
    model.double()
    _hooks_only(model, range(2, 4))
    tracker = _method(model)._importance
    assert tracker is not None and tracker.sens[0].dtype == torch.float64


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_r": 4, "target_r": 8}, "target_r=8 exceeds init_r=4.*raise init_r or lower"),
        ({"init_r": 0}, "init_r must be a positive integer"),
        ({"total_steps": 0}, "total_steps must be a positive integer"),
        ({"t_init": 6, "t_final": 4}, "t_init \\+ t_final = 10 .* total_steps=10; lower"),
        ({"t_init": -1}, "t_init must be a non-negative number of steps \\(or None"),
        ({"t_final": 9}, "t_init \\+ t_final = 10 leaves"),  # t_init None: 10 // 8 = 1
        ({"delta_t": 0}, "delta_t must be a positive integer"),
        ({"beta1": 1.0}, "beta1 must be in \\(0, 1\\)"),
        ({"beta2": 0.0}, "beta2 must be in \\(0, 1\\)"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
        ({"alpha": 0}, "alpha must be a positive"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_config_errors_name_the_fix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**{"total_steps": 10, **fields})


def test_config_requires_total_steps_and_round_trips() -> None:
    with pytest.raises(TypeError, match="total_steps"):
        AdaLoraConfig()  # type: ignore[call-arg]
    config = AdaLoraConfig(total_steps=100, init_r=6, target_r=3, targets=["q_proj"], t_init=10)
    assert AdaLoraConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


# -- benchmark script ----------------------------------------------------------------------------
def test_benchmark_script_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "adalora_step.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "adalora / floor" in done.stdout
