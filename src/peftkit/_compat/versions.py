"""Which transformers peftkit supports, and the error that says a piece of it is missing."""

from __future__ import annotations

import re

# The oldest transformers the suite is run against (``nox -s oldest``); pyproject declares the same.
# No upper bound: no release is known to break peftkit, and the capability checks below fail loudly
# (naming the version and the missing piece) if one does.
TRANSFORMERS_MIN = (4, 57, 1)  # 4.57.0 was yanked
# The newest release the suite has been run against, named in errors to help a bug report.
TRANSFORMERS_TESTED = "5.24.0"
# Prefix-tuning on encoder-decoder models: on 4.57 T5's encoder bias and BART's padded generation
# come out wrong with a prefix, and no release between it and the tested one has been checked.
SEQ2SEQ_PREFIX_MIN = (5, 24, 0)


class UnsupportedModelError(TypeError):
    """A model, or the installed transformers, lacks what a peftkit feature needs."""


def transformers_window(minimum: tuple[int, int, int] = TRANSFORMERS_MIN) -> str:
    """The declared window, as a pip requirement: ``transformers>=4.57.1``."""
    return "transformers>=" + ".".join(str(n) for n in minimum)


def transformers_version() -> str:
    """The installed transformers version (importing it)."""
    import transformers

    return str(transformers.__version__)


def check_transformers_version(
    version: str, feature: str = "peftkit", minimum: tuple[int, int, int] = TRANSFORMERS_MIN
) -> None:
    """Raise ``UnsupportedModelError`` when ``version`` is older than ``minimum`` (by default the
    declared window's)."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    if len(numbers) < 2 or tuple(numbers + [0] * (3 - len(numbers))) < minimum:
        window = transformers_window(minimum)
        raise UnsupportedModelError(
            f"{feature} needs {window} (tested through {TRANSFORMERS_TESTED}); "
            f"transformers {version} is installed. Upgrade: pip install '{window}'"
        )


def _missing(piece: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"transformers {transformers_version()} lacks {piece}, which peftkit relies on (declared "
        f"window {transformers_window()}, tested through {TRANSFORMERS_TESTED}). {fix}"
    )
