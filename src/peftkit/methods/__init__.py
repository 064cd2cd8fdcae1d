"""Built-in methods. Importing this package registers them; one method, one file."""

from . import adapter, full, lora, prefix
from .base import MergeReport, Method, SwapMethod

__all__ = ["MergeReport", "Method", "SwapMethod", "adapter", "full", "lora", "prefix"]
