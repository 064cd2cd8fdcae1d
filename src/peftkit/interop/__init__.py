"""Interoperability with other adapter formats: HF ``peft`` (``export_peft`` / ``import_peft``)."""

# the built-in converters register themselves on import (as methods do in the registry)
from . import peft_adalora, peft_ia3, peft_lora, peft_prefix  # noqa: F401
from .peft import (
    Converted,
    InteropError,
    PeftAdapter,
    PeftConverter,
    converters,
    export_peft,
    import_peft,
    register_peft_converter,
)

__all__ = [
    "Converted",
    "InteropError",
    "PeftAdapter",
    "PeftConverter",
    "converters",
    "export_peft",
    "import_peft",
    "register_peft_converter",
]
