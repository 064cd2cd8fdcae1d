"""Built-in methods. Importing this package registers them; one method, one file."""

from . import adalora, lora
from .base import MergeReport, Method, SwapMethod

__all__ = ["MergeReport", "Method", "SwapMethod", "adalora", "lora"]
