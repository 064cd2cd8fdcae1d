"""A bound on what a ``re:<regex>`` module pattern may cost.

Patterns come from users and from checkpoint files, and Python's ``re`` backtracks with no time
limit: ``re:(.*)*Z`` takes 2 s on a 24-character module name and doubles with every character,
and no timeout can interrupt a running match. So a pattern is checked once, when its config is
built, and refused when it could blow up:

- longer than ``MAX_LENGTH`` characters (module names are short; a long pattern is a generated
  or hostile one);
- a repetition inside a repetition, or alternatives inside a repetition (``(a*)*``, ``(a|a)*``):
  the shapes that make backtracking exponential. A plain ``.*``, ``\\d+``, ``(q|k)_proj`` or
  ``[\\w.]*`` passes;
- more than ``MAX_REPEATS`` repetitions in sequence: a failing match costs up to about n^(k+1)
  steps for a name of n characters (``.*a.*a.*a.*aZ``: 50 ms on a 60-character name, 1.6 s on a
  200-character one; with three repetitions, under 1 ms on 60 characters).

What passes runs in time polynomial and of low degree in the (short) name, against the model's
own module names only; ``targeting`` also stops with an error when matching one set of patterns
takes longer than ``targeting.MATCH_BUDGET_S``, so a load can be slow at worst, never hang.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

MAX_LENGTH = 500
MAX_REPEATS = 3
_FIX = "rewrite it without a repeated group, e.g. '[\\w.]*' instead of '(\\w+\\.)*'"


def check_regex(where: str, pattern: str) -> None:
    """Raise ``ValueError`` naming ``where`` when ``pattern`` (without ``re:``) is invalid or could
    take exponential time to match."""
    if len(pattern) > MAX_LENGTH:
        raise ValueError(
            f"{where}: the regular expression is {len(pattern)} characters long; at most "
            f"{MAX_LENGTH} are accepted (module names are short)"
        )
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from err
    nested, repeats = _shape(pattern)
    if nested:
        raise ValueError(
            f"{where}: {pattern!r} repeats a group that itself repeats or has alternatives, which "
            f"can take exponential time to match; {_FIX}"
        )
    if repeats > MAX_REPEATS:
        raise ValueError(
            f"{where}: {pattern!r} has {repeats} repetitions (*, +, {{m,n}}); at most "
            f"{MAX_REPEATS} are accepted, as each one multiplies the cost of a match. Anchor it "
            "with literal parts of the module name instead"
        )


def _shape(pattern: str) -> tuple[bool, int]:
    """(whether a repetition holds a repetition or alternatives, how many repetitions there are)."""
    try:
        parser: Any = importlib.import_module("re._parser")
        items = list(parser.parse(pattern))
    except (ImportError, AttributeError):  # no parser on this Python: a conservative text check
        return re.search(r"\)[*+{]", pattern) is not None, len(re.findall(r"[*+}]", pattern))
    found = _Found()
    _walk(items, inside_repeat=False, found=found)
    return found.nested, found.repeats


class _Found:
    nested = False
    repeats = 0


def _walk(items: Any, *, inside_repeat: bool, found: _Found) -> None:
    """Visit a parsed pattern, noting repetitions (``MAX_REPEAT`` / ``MIN_REPEAT`` with a maximum
    above 1) and whether one holds another repetition or alternatives (``BRANCH``)."""
    for op, arg in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            repeats = arg[1] > 1
            found.repeats += repeats
            found.nested |= inside_repeat and repeats
            _walk(arg[2], inside_repeat=inside_repeat or repeats, found=found)
        elif name == "BRANCH":
            found.nested |= inside_repeat
            for branch in arg[1]:
                _walk(branch, inside_repeat=inside_repeat, found=found)
        elif name == "SUBPATTERN":
            _walk(arg[-1], inside_repeat=inside_repeat, found=found)
        elif name in ("ASSERT", "ASSERT_NOT"):
            _walk(arg[1], inside_repeat=inside_repeat, found=found)
