"""A run's output directory: ``checkpoint-N/`` directories, ``best/`` and ``log.jsonl``.

Only the main process writes; every process takes part in the collectives (RNG states are gathered
so each rank resumes its own generators) and waits at a barrier until the files exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import _sharding
from ..checkpoint import CheckpointError
from . import distributed
from . import state as S
from .distributed import Dist
from .monitor import LOG_NAME, truncate_log

BEST = "best"


class RunDirectory:
    """``path`` (None: nothing is written) seen from process ``where``; ``keep`` newest checkpoints."""

    def __init__(self, path: Path | None, where: Dist, keep: int | None) -> None:
        self.path, self.where, self.keep = path, where, keep

    @property
    def log_path(self) -> Path | None:
        return self.path / LOG_NAME if self.path is not None else None

    def save(self, step: int, model: nn.Module, state: dict[str, Any]) -> Path | None:
        """Write ``checkpoint-<step>``: the weights and ``state`` plus every rank's RNG states."""
        rngs = distributed.gather(S.rng_state(), self.where)
        if self.path is None or not self.where.main:
            if self.path is not None and _sharding.any_sharded(model.parameters()):
                S.save_weights(model, None)  # FSDP2: take part in gathering what rank 0 writes
            distributed.barrier(self.where)
            return None
        target = self.path / f"checkpoint-{step}"
        with S.atomic_directory(target) as tmp:
            S.save_weights(model, tmp)
            S.write_state(tmp, {**state, "rng": rngs})
        S.prune_checkpoints(self.path, self.keep)
        distributed.barrier(self.where)
        return target

    def save_best(self, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        """Replace ``best/`` with the current adapter (adapter only) and its ``best.json``."""
        if self.path is None or not self.where.main:
            if self.path is not None and _sharding.any_sharded(model.parameters()):
                S.save_weights(model, None)  # FSDP2: take part in gathering what rank 0 writes
            return
        with S.atomic_directory(self.path / BEST) as tmp:
            S.save_weights(model, tmp)
            S.write_json_atomic(tmp / "best.json", {"step": step, "metrics": metrics})

    def load_best(self, model: nn.Module) -> None:
        distributed.barrier(self.where)
        if self.path is not None and (self.path / BEST).exists():
            S.load_weights(model, self.path / BEST)

    def newest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint (as the main process sees it), on every process."""
        found = S.checkpoints(self.path) if self.path is not None and self.where.main else []
        newest = distributed.broadcast(found[-1] if found else None, self.where)
        return (newest[0], Path(newest[1])) if newest else None

    def resume_path(self, resume_from: str | Path | None) -> Path | None:
        """A checkpoint to resume from: a path, ``"latest"`` (None when there is none yet) or None."""
        if resume_from is None:
            return None
        if str(resume_from) != "latest":
            return Path(resume_from)
        if self.path is None:
            raise ValueError("resume_from='latest' needs TrainConfig(output_dir=...)")
        newest = self.newest()
        return newest[1] if newest else None

    def start_fresh(self) -> None:
        """Refuse to mix a new run into a directory holding another run's checkpoints."""
        newest = self.newest()
        if newest is not None:
            raise ValueError(
                f"{self.path} already holds checkpoints ({newest[1].name}); pass "
                "resume_from='latest' to continue that run, or use another output_dir"
            )
        if self.log_path is not None and self.where.main:
            truncate_log(self.log_path, 0)

    def read(self, path: Path, settings: dict[str, Any]) -> dict[str, Any]:
        """The training state in ``path``; ``settings`` must equal those it was saved with."""
        state = S.read_state(path)
        _check_world(path, state.get("world"), settings.get("world"))
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in settings.items() if state.get(k) != v]
        if changed:
            raise CheckpointError(
                f"{path} was written by a run with other settings ({', '.join(changed)}); "
                "resume with the same ones, or start a new run"
            )
        return state

    def resume_log(self, step: int) -> None:
        """Drop log records a killed run wrote after ``step``, the step it resumes from."""
        if self.log_path is not None and self.where.main:
            truncate_log(self.log_path, step)


def _check_world(path: Path, saved: Any, now: Any) -> None:
    """A checkpoint resumes on as many processes as wrote it: each process's share of the epoch
    (its data position) and its RNG streams are laid out for that number."""
    if saved is None or saved == now:
        return
    raise CheckpointError(
        f"{path} was written by a run of {saved} process(es), this one has {now}: each process's "
        "share of the data, its position in the epoch and its random number streams belong to "
        f"{saved} processes, so the run cannot continue exactly. Resume it with "
        f"torchrun --nproc_per_node={saved}, or start a new run that loads the adapter "
        "(load_adapter reads the checkpoint in any number of processes)"
    )
