"""The learning rate of a run whose ``TrainConfig`` leaves ``lr`` unset: the methods' own default.

Each method's config class declares ``train_defaults`` (a ``TrainDefaults``): the lr it is known to
want (LoRA's 1e-3 is twenty times full fine-tuning's 5e-5); a config whose rate depends on its
fields answers through ``MethodConfig.training_defaults()``. ``resolve`` reads them from the
adapters on the model when the Trainer starts a run:

- an explicit ``TrainConfig(lr=...)`` always wins, untouched;
- one method (or several that agree): its default;
- several that disagree: the smallest of them (a rate fit for the most sensitive method; the
  others learn slower, not diverge), and the message names each choice;
- no adapter on the model (a plain module with its own trainable parameters), or a method that
  declares no default: ``FALLBACK_LR``, the value ``TrainConfig.lr`` had before it could be unset.

The resolved config is what the run trains with and saves in its checkpoints, so a resumed run
compares like with like.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core import adapters
from .config import TrainConfig

FALLBACK_LR = 1e-4


def method_lrs(model: nn.Module) -> dict[str, float | None]:
    """``{method name: its declared default lr, or None}`` for ``model``'s adapters, in order."""
    out: dict[str, float | None] = {}
    for method in adapters(model).values():
        declared = method.config.training_defaults()
        out.setdefault(method.name, declared.lr if declared is not None else None)
    return out


def resolve(model: nn.Module, config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """``config`` with ``lr`` filled in from ``model``'s methods, and the line saying so.

    The line is None when ``config.lr`` was given (nothing was chosen for the user).
    """
    if config.lr is not None:
        return config, None
    declared = method_lrs(model)
    lrs = {name: FALLBACK_LR if lr is None else lr for name, lr in declared.items()}
    undeclared = [name for name, lr in declared.items() if lr is None]
    if not lrs:
        lr, source = FALLBACK_LR, "no adapter on the model: the fallback for a plain model"
    elif len(set(lrs.values())) == 1:
        lr = next(iter(lrs.values()))
        source = f"default for {' + '.join(lrs)}"
    else:
        lr = min(lrs.values())
        choices = ", ".join(f"{name} {value:g}" for name, value in lrs.items())
        source = f"the smallest of the methods' defaults: {choices}"
    if undeclared:
        source += f"; {', '.join(undeclared)} declares no train_defaults: fallback {FALLBACK_LR:g}"
    line = f"lr={lr:g} ({source}); set TrainConfig(lr=...) to choose another"
    return dataclasses.replace(config, lr=lr), line
