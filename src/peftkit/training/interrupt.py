"""Ctrl-C during ``fit``: the first SIGINT asks the loop to stop at the next step boundary (where
the Trainer writes a checkpoint and raises ``KeyboardInterrupt``); a second one aborts at once.

The handler is installed only on the main thread and only over Python's default handler, so a
program that handles SIGINT itself keeps its own behaviour. Under DDP the processes agree (one
all-reduce per step) so that every process stops after the same step and saves together.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from .distributed import Dist

MESSAGE = (
    "peftkit: interrupted; stopping after this step and saving a checkpoint "
    "(press Ctrl-C again to abort at once)"
)


class StopRequest:
    """A context manager around the loop; ``due(where)`` says whether to stop after this step.

    Under several processes the answer is ``agreed``: whether any process had been interrupted when
    the step's one all-reduce ran (the Trainer folds ``requested`` into it), so every process stops
    after the same step without a collective of its own."""

    def __init__(self) -> None:
        self.requested = False
        self.agreed = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: abort now, wherever the loop is
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
            raise KeyboardInterrupt
        self.requested = True
        print(MESSAGE, file=sys.stderr, flush=True)

    def due(self, where: Dist) -> bool:
        """Whether to stop now (all processes get the same answer)."""
        return self.agreed if where.active else self.requested
