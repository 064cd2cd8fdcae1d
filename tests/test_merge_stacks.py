"""Every built-in method (and variant: DoRA) over every other, two deep, on one model: merge gives the
same outputs, unmerge gives the weights back, unload gives the base back, all within 1e-6 (float64),
or a layer is kept with its reason."""

from __future__ import annotations

import itertools

import pytest
import torch

import peftkit
from test_contract import CONTRACT_CONFIGS, CONTRACTED, UNSUPPORTED

from zoo import CASES

CASE = CASES["transformer"]
METHODS = [m for m in CONTRACTED if (m, CASE.name) not in UNSUPPORTED]
# (inner, outer) stacks that refuse to build, with the message: DoRA normalises the weight below
# it, which a bottleneck adapter (not linear in the weight) does not have.
DECLINED = {
    ("adapter", "dora"): r"DoRA \(dora=True\) at 'layers\.0\.o_proj' normalises the weight the "
    r"layers below compute with, but the SequentialAdapter of adapter 'a' there has no such weight"
}
PAIRS = [
    (a, b)
    for a, b in itertools.product(METHODS, METHODS)
    if (a != b or a not in ("full", "adalora"))  # full and AdaLoRA apply once per model
    and (a, b) not in DECLINED
]


def _build() -> torch.nn.Module:
    return CASE.build().double()


def _original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base modules' tensors under their plain names (wrappers see through to them)."""
    state = {}
    for key, value in model.state_dict().items():
        plain = key
        while ".base." in plain:
            plain = plain.replace(".base.", ".", 1)
        state[plain] = value.detach().clone()
    return state


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def _apply_both(inner: str, outer: str) -> torch.nn.Module:
    model = _build()
    for seed, (name, method) in enumerate([("a", inner), ("b", outer)]):
        peftkit.apply(model, CONTRACT_CONFIGS[method](CASE), adapter_name=name)
        with torch.no_grad():  # each adapter moves on its own (not only the last one)
            for p in peftkit.adapters(model)[name].parameters():
                g = torch.Generator().manual_seed(seed + 1)
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * 0.1)
    return model


@pytest.mark.parametrize(("inner", "outer"), sorted(DECLINED))
def test_declined_stacks_raise_and_keep_the_inner_adapter(inner: str, outer: str) -> None:
    model = _build()
    peftkit.apply(model, CONTRACT_CONFIGS[inner](CASE), adapter_name="a")
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=DECLINED[(inner, outer)]):
        peftkit.apply(model, CONTRACT_CONFIGS[outer](CASE), adapter_name="b")
    assert list(peftkit.adapters(model)) == ["a"]
    assert {n: type(m) for n, m in model.named_modules()} == types


@pytest.mark.parametrize(("inner", "outer"), PAIRS)
def test_two_deep_merge_unmerge_unload(inner: str, outer: str) -> None:
    plain = dict(_build().state_dict())
    model = _apply_both(inner, outer)
    inputs = CASE.inputs()
    weights = _original(model)
    with torch.no_grad():
        expected = model(**inputs)
        report = peftkit.merge(model)
        assert all(reason for reason in report.kept.values()), report
        torch.testing.assert_close(model(**inputs), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        _close(_original(model), {k: weights[k] for k in plain})
        torch.testing.assert_close(model(**inputs), expected, atol=1e-6, rtol=0)
        peftkit.merge(model)
        peftkit.unload(model)
        _close(model.state_dict(), plain)


# -- torch's own layers: nn.Conv1d and nn.MultiheadAttention (both weights of the attention) -----
class _SeqNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        return self.head(self.mha(h, h, h, need_weights=False)[0])


TORCH_CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=2, alpha=4, targets=["conv", "mha"]),
    "full": lambda: peftkit.FullConfig(modules=["conv", "mha"]),
    "ia3": lambda: peftkit.IA3Config(targets=["head"]),
}
TORCH_PAIRS = [
    ("lora", "lora"),
    ("lora", "full"),
    ("full", "lora"),
    ("lora", "ia3"),
    ("ia3", "lora"),
]


@pytest.mark.parametrize(("inner", "outer"), TORCH_PAIRS)
def test_two_deep_on_torch_layers(inner: str, outer: str) -> None:
    plain = dict(_SeqNet().double().state_dict())
    model = _SeqNet().double()
    for seed, (name, method) in enumerate([("a", inner), ("b", outer)]):
        peftkit.apply(model, TORCH_CONFIGS[method](), adapter_name=name)
        with torch.no_grad():
            for p in peftkit.adapters(model)[name].parameters():
                g = torch.Generator().manual_seed(seed + 1)
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * 0.1)
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = _original(model)
    with torch.no_grad():
        expected = model(x)
        report = peftkit.merge(model)
        assert all(reason for reason in report.kept.values()), report
        assert any(name.endswith(":mha") for name in report.merged), report
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        _close(_original(model), {k: weights[k] for k in plain})
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        peftkit.merge(model)
        peftkit.unload(model)
        _close(model.state_dict(), plain)
