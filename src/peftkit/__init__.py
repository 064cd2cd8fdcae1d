"""peftkit: parameter-efficient fine-tuning for any torch model.

from peftkit import apply_lora, save_adapter, merge_and_unload
apply_lora(model, r=8, targets=["q_proj", "v_proj"])   # in place; base frozen
Trainer(model, TrainConfig(epochs=3, lr=1e-3)).fit(train_dataset, eval_dataset)
save_adapter(model, "out/")
model = merge_and_unload(model)                          # plain model, no adapter overhead
"""

from . import augment, losses, metrics, quant
from . import interop as _interop  # noqa: F401  (registers load_adapter's peft directory reader)
from ._version import __version__
from .checkpoint import CheckpointError, load_adapter, save_adapter
from .compose import combine_lora, compose, ensemble
from .config import ALL_LINEAR, MethodConfig, TargetedConfig, TrainDefaults
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
from .layers import AdapterLayer, AdapterModule, SavedModule
from .methods.adalora import AdaLoraConfig, apply_adalora, rank_pattern
from .methods.adapter import AdapterConfig, apply_adapter
from .methods.base import MergeReport, Method, SwapMethod
from .methods.full import FullConfig, apply_full
from .methods.ia3 import IA3Config, apply_ia3
from .methods.lora import LoraConfig, apply_lora
from .methods.prefix import PrefixConfig, apply_prefix, fold_prefix
from .plain import PlainModelError, plain_state_dict
from .registry import methods, register_method
from .summary import TrainableSummary, print_trainable_parameters, trainable_summary
from .targeting import TargetError
from .trainer import Trainer
from .training.config import TrainConfig
from .training.progress import NonFiniteLossError, TrainResult

__all__ = [
    "ALL_LINEAR",
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModule",
    "CheckpointError",
    "FullConfig",
    "IA3Config",
    "LoraConfig",
    "MergeReport",
    "Method",
    "MethodConfig",
    "NonFiniteLossError",
    "PlainModelError",
    "PrefixConfig",
    "SavedModule",
    "SwapMethod",
    "TargetError",
    "TargetedConfig",
    "TrainConfig",
    "TrainDefaults",
    "TrainResult",
    "TrainableSummary",
    "Trainer",
    "__version__",
    "active_adapters",
    "adapter_state_dict",
    "adapters",
    "apply",
    "apply_adalora",
    "apply_adapter",
    "apply_full",
    "apply_ia3",
    "apply_lora",
    "apply_prefix",
    "augment",
    "combine_lora",
    "compose",
    "delete_adapter",
    "disable_adapters",
    "ensemble",
    "fold_prefix",
    "load_adapter",
    "load_adapter_state_dict",
    "losses",
    "merge",
    "merge_and_unload",
    "methods",
    "metrics",
    "plain_state_dict",
    "print_trainable_parameters",
    "quant",
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
