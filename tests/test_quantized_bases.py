"""LoRA, AdaLoRA and bottleneck adapters on quantized bases (bitsandbytes 4/8-bit, torchao, quanto,
hqq): factor shapes from the logical features, training, bit-identical save/load, and merging that
re-quantizes (reporting the error) or refuses naming the fix. Each case skips without its package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import apply_adalora, apply_adapter, apply_lora, load_adapter, merge, save_adapter
from peftkit.quant import base_kind
from quant_backends import BACKENDS, QUANTIZED

X = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))


def _apply(model: nn.Module, method: str) -> None:
    targets = list(QUANTIZED)
    if method == "lora":
        apply_lora(model, r=4, targets=targets)
    elif method == "adalora":
        apply_adalora(
            model, init_r=4, target_r=2, total_steps=20, t_init=2, t_final=5, delta_t=2,
            targets=targets,
        )  # fmt: skip
    else:
        apply_adapter(model, targets=targets, bottleneck=8)


def _train(model: nn.Module, steps: int = 20, lr: float = 1e-2) -> list[float]:
    params = list(peftkit.trainable_parameters(model))
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_quantized_layer_has_a_kind_with_its_logical_shape(backend: str) -> None:
    model = BACKENDS[backend][0]()
    for i in QUANTIZED:
        kind = base_kind(model[int(i)])
        assert kind is not None, f"{type(model[int(i)]).__name__} has no base kind"
        dense = peftkit.quant.dequantize(BACKENDS[backend][0]())[int(i)]
        assert kind.features(model[int(i)]) == (dense.in_features, dense.out_features)
    assert base_kind(model[4]) is None  # the full-precision output layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_factors_take_the_logical_shape_and_float32(backend: str) -> None:
    model = BACKENDS[backend][0]()
    apply_lora(model, r=4, targets=list(QUANTIZED))
    first, second = model[0], model[2]
    assert first.lora_A.shape == (4, 64) and first.lora_B.shape == (64, 4)
    assert second.lora_A.shape == (4, 64) and second.lora_B.shape == (32, 4)
    assert {p.dtype for p in peftkit.trainable_parameters(model)} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_lowers_the_loss_and_save_load_is_bit_identical(
    backend: str, method: str, tmp_path: Path
) -> None:
    build = BACKENDS[backend][0]
    model = build()
    before = model(X).detach()
    _apply(model, method)
    assert torch.equal(model(X), before)  # starts at the identity
    losses = _train(model)
    assert losses[-1] < 0.9 * losses[0], losses
    model.eval()
    out = model(X)
    save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "peftkit_model.safetensors")
    base_names = {n for n, _ in build().named_parameters()}
    assert not any(key.split(".", 1)[-1] in base_names for key in saved)  # the adapter only
    assert {t.dtype for t in saved.values()} <= {torch.float32}
    fresh = build()
    load_adapter(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(X), out)


def _merge_case(backend: str) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    model = BACKENDS[backend][0]()
    apply_lora(model, r=4, targets=list(QUANTIZED))
    _train(model, steps=10, lr=1e-2)
    model.eval()
    with torch.no_grad():
        deltas = {i: model[int(i)].delta_weight() for i in QUANTIZED}
        return model, model(X), deltas


def _dense(module: nn.Module) -> torch.Tensor:
    kind = base_kind(module)
    assert kind is not None
    return kind.dequantize(module)


@pytest.mark.parametrize("backend", [b for b, (_, requant) in BACKENDS.items() if requant])
def test_merge_requantizes_reports_the_error_and_unmerge_restores_exactly(backend: str) -> None:
    model, out, deltas = _merge_case(backend)
    bases = {i: model[int(i)].base_layer() for i in QUANTIZED}
    original = {i: _dense(bases[i]).clone() for i in QUANTIZED}
    report = merge(model)
    assert sorted(report.merged) == [f"default:{i}" for i in QUANTIZED] and not report.kept
    for i in QUANTIZED:
        target = original[i] + deltas[i]
        got = _dense(bases[i])
        error = float((got - target).norm() / deltas[i].norm())
        assert report.requantized[f"default:{i}"] == pytest.approx(error, rel=1e-5)
        assert error < 0.5, "the re-quantized weight must carry most of the update"
        # the update is in the weight: far closer to W + ΔW than W alone is
        assert (got - target).norm() < 0.5 * (original[i] - target).norm()
    assert "re-quantized default:0: error" in str(report)
    merged_out = model(X)
    assert (merged_out - out).abs().max() < 0.25 * (out - merged_out.new_zeros(())).abs().max()
    peftkit.unmerge(model)
    for i in QUANTIZED:
        assert torch.equal(_dense(bases[i]), original[i])  # the stored quantized weight is back
    assert torch.equal(model(X), out)


@pytest.mark.parametrize("backend", [b for b, (_, requant) in BACKENDS.items() if not requant])
def test_merge_refuses_a_base_it_cannot_requantize_and_names_the_fix(backend: str) -> None:
    model, out, _ = _merge_case(backend)
    report = merge(model)
    assert not report.merged
    for i in QUANTIZED:
        reason = report.kept[f"default:{i}"]
        assert "quantized base" in reason and "merge_and_unload" in reason, reason
        assert "peftkit.quant.dequantize(model)" in reason
    assert torch.equal(model(X), out)  # nothing dropped, nothing changed
    with pytest.warns(UserWarning):  # merge_and_unload keeps the refused layers, and says so
        kept = peftkit.merge_and_unload(model)
    assert torch.equal(kept(X), out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_then_merge_and_unload_gives_a_plain_model(backend: str) -> None:
    model, out, _ = _merge_case(backend)
    peftkit.quant.dequantize(model)
    dense_out = model(X)  # same weights; LLM.int8() also quantizes activations, hence the bound
    assert (dense_out - out).abs().max() < 0.02 * out.abs().max()
    plain = peftkit.merge_and_unload(model)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in plain.modules())
    torch.testing.assert_close(plain(X), dense_out, atol=1e-5, rtol=1e-5)


class _ReadOnlyWeight(torch.Tensor):
    """A weight subclass that, like many quantized formats, has no in-place arithmetic."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("add_", "sub_", "copy_"):
            raise NotImplementedError(f"{func.__name__} is not supported by this tensor type")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_weight_subclass_nothing_handles_is_refused_with_a_reason() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    weight = model[0].weight.detach().as_subclass(_ReadOnlyWeight)
    model[0].weight = nn.Parameter(weight, requires_grad=False)
    apply_lora(model, r=2, targets=["0"])
    with torch.no_grad():
        model[0].lora_B.fill_(0.1)
    report = merge(model)
    reason = report.kept["default:0"]
    assert "_ReadOnlyWeight tensor subclass" in reason and "merge_and_unload" in reason


def test_quantization_packages_are_not_imported_by_peftkit() -> None:
    import subprocess
    import sys

    code = (
        "import sys, peftkit, torch; from torch import nn;"
        "m = nn.Sequential(nn.Linear(4, 4)); peftkit.apply_lora(m, r=2, targets=['0']);"
        "peftkit.merge(m);"
        "print(sorted(p for p in ('bitsandbytes', 'torchao', 'optimum.quanto', 'hqq') "
        "if p in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
