"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import peftkit


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter tensor random values, so merges and reloads are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def has_adapter_layers(model: nn.Module) -> bool:
    return any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())


@contextmanager
def temporarily_registered(name: str, config_cls: type, method_cls: type) -> Iterator[None]:
    """Register a test-only method for the duration of a test, then remove it again, so it does
    not leak into tests that walk every registered method (the demo, the contract)."""
    from peftkit import _keywords, registry

    registry.register_method(name, config_cls, override=True)(method_cls)
    try:
        yield
    finally:
        registry._BY_NAME.pop(name, None)
        _keywords.REGISTERED_CONFIGS.pop(name, None)


class OutputShapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns (to show what is never formed)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def pyproject() -> dict[str, Any]:
    """The ``[project]`` table of pyproject.toml (tomllib from Python 3.11, tomli before)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    project: dict[str, Any] = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return project


def _seq2seq_prefix_supported() -> bool:
    """Whether the installed transformers takes a prefix on encoder-decoder models."""
    from peftkit import _compat

    try:
        version = _compat.transformers_version()
        _compat.check_transformers_version(version, "prefix", _compat.SEQ2SEQ_PREFIX_MIN)
    except (ImportError, _compat.UnsupportedModelError):
        return False
    return True


SEQ2SEQ_PREFIX = _seq2seq_prefix_supported()
# what applying prefix-tuning to an encoder-decoder model says on an older transformers
SEQ2SEQ_PREFIX_REFUSAL = (
    r"prefix-tuning on an encoder-decoder model \(\w+\) needs transformers>=5\.24\.0 .*Upgrade"
)
