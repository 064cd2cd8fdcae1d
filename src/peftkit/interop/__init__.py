"""Interoperability with other adapter formats: HF ``peft`` (``export_peft`` / ``import_peft``)."""

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
