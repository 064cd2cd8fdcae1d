"""Whether a torch layer subclass that replaces ``forward`` still computes the layer's standard
function of its weight, checked numerically.

A merge folds an update into ``weight`` and assumes the module's output is torch's own function of
it (``F.linear(x, weight, bias)``, the embedding lookup, the convolution). transformers'
``FalconLinear`` replaces ``forward`` with ``x @ weight.T + bias``: the same function, so a merge is
exact; a scaled embedding (``embedding(ids) * sqrt(d)``) is not, and folding would scale the update
too. Instead of refusing by class, ``forward_mismatch`` runs the module's own ``forward`` on a small
random input and compares it with torch's parent class's ``forward`` on the same module.

The probe has no side effect: the input comes from a private generator (the global RNG is not
drawn), it runs without grad, without autocast, in eval mode (restored after), bypassing hooks, and
every buffer is put back as it was. A weight that holds no data (meta, offloaded) is not probed: the
merge is refused, naming the cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _compat

_SEED = 20240601
# relative tolerance of the comparison per dtype: a few units of the format's rounding, as two
# kernels computing the same product in a different order differ by that much
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def forward_owner(module: nn.Module) -> str | None:
    """The class that replaces a torch layer's forward, or None when the forward is torch's own (or
    transformers' Conv1D, whose forward is its standard function by definition)."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    conv1d = _compat.conv1d_class()  # None unless transformers is already loaded
    if owner is None or owner.__module__.startswith("torch.nn."):
        return None
    if conv1d is not None and issubclass(owner, conv1d):
        return None
    return owner.__qualname__


def _torch_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class ``module`` derives from (its standard forward), if a known one."""
    for cls in type(module).__mro__:
        if cls in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return cls
    return None


def _sample(module: nn.Module, cls: type[nn.Module], weight: torch.Tensor) -> torch.Tensor:
    """A small random input of the right shape, dtype and device for ``module``."""
    gen = torch.Generator(device=weight.device).manual_seed(_SEED)
    opts: dict[str, Any] = {"generator": gen, "device": weight.device}
    if cls is nn.Embedding:
        return torch.randint(0, int(weight.shape[0]), (2, 5), **opts)
    if cls is nn.Linear:
        return torch.randn(3, int(weight.shape[1]), dtype=weight.dtype, **opts)
    conv: Any = module
    spatial = [d * (k - 1) + 3 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    size = (1, int(conv.in_channels), *spatial)
    return torch.randn(size, dtype=weight.dtype, **opts)


@contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Run the probe in eval mode, without grad or autocast; restore modes and buffers after."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    device = next((b.device.type for b in module.buffers()), "cpu")
    try:
        module.eval()
        with torch.no_grad(), torch.autocast(device, enabled=False):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _compare(got: torch.Tensor, want: torch.Tensor, name: str) -> str | None:
    """None when ``got`` is ``want`` within the dtype's tolerance, else what differs."""
    if got.shape != want.shape:
        return f"its output has shape {tuple(got.shape)} where {name} gives {tuple(want.shape)}"
    g, w = got.double(), want.double()
    rtol = _RTOL.get(want.dtype, 1e-5)
    atol = rtol * (float(w.abs().max()) + 1e-12)
    if torch.allclose(g, w, rtol=rtol, atol=atol):
        return None
    norm = float((w * w).sum())
    scale = float((g * w).sum()) / norm if norm else 0.0
    if norm and torch.allclose(g, scale * w, rtol=rtol, atol=atol * max(1.0, abs(scale))):
        return f"it scales the output by {scale:.6g}"
    return f"it differs from it by up to {float((g - w).abs().max()):.3g}"


def forward_mismatch(module: nn.Module) -> str | None:
    """Why an update folded into ``module.weight`` would not give the same outputs because the
    module's own forward is not torch's standard function of its weight, or None when it is (or
    the forward is torch's own)."""
    owner = forward_owner(module)
    if owner is None:
        return None
    cls, weight = _torch_class(module), getattr(module, "weight", None)
    what = f"its base {type(module).__name__} computes its own forward() ({owner})"
    if cls is None or not isinstance(weight, torch.Tensor):
        return (
            f"{what}, and peftkit knows no standard function of the weight to check it against, so "
            "the update folded into the weight might not give the same outputs"
        )
    if weight.is_meta or weight.numel() == 0:
        return (
            f"{what}, and its weight holds no data here (meta or offloaded), so peftkit cannot "
            "check that it is the standard function of the weight; load the weights onto a "
            "device, then merge"
        )
    standard: Callable[..., torch.Tensor] = cls.forward
    name = f"torch's {cls.__name__}.forward"
    x = _sample(module, cls, weight)
    with _untouched(module):
        try:
            got = type(module).forward(module, x)
            want = standard(module, x)
        except Exception as error:
            return (
                f"{what}, and checking it on a sample input failed ({error}); it stays as a layer"
            )
    if not isinstance(got, torch.Tensor):
        return f"{what}, which returns a {type(got).__name__}, not a tensor; it stays as a layer"
    differs = _compare(got, want, name)
    if differs is None:
        return None
    return (
        f"{what}, whose output is not {name} of its weight: {differs}; the update folded into the "
        "weight would not give the same outputs"
    )
