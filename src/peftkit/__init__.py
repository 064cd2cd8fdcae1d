"""peftkit: parameter-efficient fine-tuning for any torch model.

from peftkit import apply_lora, save_adapter, merge_and_unload
apply_lora(model, r=8, targets=["q_proj", "v_proj"])   # in place; base frozen
...train...
save_adapter(model, "out/")
merge_and_unload(model)                                  # plain model, no adapter overhead
"""

from ._version import __version__
from .checkpoint import CheckpointError, load_adapter, save_adapter
from .config import ALL_LINEAR, MethodConfig, TargetedConfig
from .core import (
    active_adapters,
    adapter_state_dict,
    adapters,
    apply,
    delete_adapter,
    disable_adapters,
    load_adapter_state_dict,
    merge,
    merge_and_unload,
    regularizer,
    set_active,
    step_hooks,
    trainable_parameters,
    unload,
    unmerge,
)
from .layers import AdapterLayer, SavedModule
from .methods.adalora import AdaLoraConfig, apply_adalora, rank_pattern
from .methods.base import MergeReport, Method, SwapMethod
from .methods.lora import LoraConfig, apply_lora
from .registry import methods, register_method
from .summary import TrainableSummary, trainable_summary
from .targeting import TargetError

__all__ = [
    "ALL_LINEAR",
    "AdaLoraConfig",
    "AdapterLayer",
    "CheckpointError",
    "LoraConfig",
    "MergeReport",
    "Method",
    "MethodConfig",
    "SavedModule",
    "SwapMethod",
    "TargetError",
    "TargetedConfig",
    "TrainableSummary",
    "__version__",
    "active_adapters",
    "adapter_state_dict",
    "adapters",
    "apply",
    "apply_adalora",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "merge",
    "merge_and_unload",
    "methods",
    "rank_pattern",
    "register_method",
    "regularizer",
    "save_adapter",
    "set_active",
    "step_hooks",
    "trainable_parameters",
    "trainable_summary",
    "unload",
    "unmerge",
]
