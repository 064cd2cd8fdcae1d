"""What a run reports: a tqdm progress bar (only on a terminal) and a JSONL log of every metric."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, Any

LOG_NAME = "log.jsonl"


class Monitor:
    """Progress bar plus metric log. ``history`` holds every record; the main process also appends
    each one as a JSON line to ``log_path`` (flushed, so a killed run keeps what it logged)."""

    def __init__(
        self,
        *,
        total: int | None,
        initial: int,
        progress: bool,
        main: bool,
        log_path: Path | None,
    ) -> None:
        from tqdm.auto import tqdm

        self.history: list[dict[str, Any]] = []
        show = progress and main and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not show, unit="step", leave=True)
        self._file: IO[str] | None = None
        if main and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def advance(self, steps: int, postfix: dict[str, float]) -> None:
        self.bar.update(steps)
        if postfix and not self.bar.disable:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        """A line above the bar (main process, terminal only)."""
        if not self.bar.disable:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def _plain(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run re-logs the steps a killed run had logged)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the run was killed
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            continue  # not a record of this log (an edited file): dropped
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
