"""Built-in methods. Importing this package registers them; one method, one file."""

from . import adalora, adapter, full, ia3, lora, prefix
from .base import MergeReport, Method, SwapMethod

__all__ = [
    "MergeReport",
    "Method",
    "SwapMethod",
    "adalora",
    "adapter",
    "full",
    "ia3",
    "lora",
    "prefix",
]
