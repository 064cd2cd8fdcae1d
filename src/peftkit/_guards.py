"""Checks that come before a change: is the model wrapped, are the names real, do the tensors fit,
can the adapters train. Each returns or raises before anything is modified."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def wrapper_kind(model: nn.Module) -> str | None:
    """The name of the parallel or compiling wrapper ``model`` is (or holds), or None.

    DistributedDataParallel / DataParallel copy or sync only the parameters that trained when they
    were built, FSDP flattens and shards them, and ``torch.compile`` traced the module tree as it
    was: an adapter injected below any of them would not be synced, sharded or compiled.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, nn.DataParallel):
        return "DataParallel"
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "torch.compile"
    for module in model.modules():
        fsdp = [
            c for c in type(module).__mro__ if c.__module__.startswith("torch.distributed.fsdp")
        ]
        if fsdp or hasattr(module, "_fsdp_wrapped_module"):
            return f"FSDP ({(fsdp or [type(module)])[0].__name__})"
    return None


def name_list(
    names: str | Sequence[str], what: str, known: Sequence[str] | None = None
) -> list[str]:
    """``names`` as a list of distinct names: one str is one name (never split into letters).

    With ``known``, every name must be among them; the error lists all unknown ones, and comes
    before the caller changes anything.
    """
    wanted = [names] if isinstance(names, str) else names
    if not isinstance(wanted, Sequence) or not all(isinstance(n, str) for n in wanted):
        raise TypeError(
            f"{what} must be a name or a list of names such as ['default'], got {names!r}"
        )
    unknown = [n for n in wanted if known is not None and n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; the model has {list(known or [])}")
    return list(dict.fromkeys(wanted))


def check_tensors_fit(own: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    """Raise one ``ValueError`` naming every missing, unexpected or misshapen tensor."""
    problems = [f"missing {k}" for k in sorted(own.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - own.keys())]
    problems += [
        f"shape of {k}: checkpoint {tuple(tensors[k].shape)}, model {shape}"
        for k, shape in own.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    if problems:
        more = f"; ... {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"adapter tensors do not fit this model ({'; '.join(problems[:10])}{more}); "
            "was the checkpoint saved from another model?"
        )
