"""The training loop: nanoGPT's step with explicit method hooks, and the few things around it.

One optimiser step (``Trainer.train_step``) reads::

    for batch in micro_batches:                          # gradient accumulation
        loss = loss_fn(model, batch) + peftkit.regularizer(model)
        (loss / len(micro_batches)).backward()
    clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    peftkit.step_hooks(model, step)                      # before zero_grad: hooks may read gradients
    scheduler.step(); optimizer.zero_grad()

Around it: evaluation with metrics, early stopping, the best adapter, atomic checkpoints that resume
exactly (weights, optimiser, scheduler, scaler, RNG states and data position), a progress bar and a
JSONL log, and DDP or FSDP2 under torchrun. See docs/trainer.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _sharding
from .core import regularizer, step_hooks
from .losses.adversarial import EmbeddingAttack
from .training import checks, defaults, distributed, evaluation, resume
from .training import data as D
from .training import state as S
from .training.config import TrainConfig
from .training.interrupt import StopRequest
from .training.monitor import Monitor
from .training.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    scheduler_state,
)
from .training.progress import NonFiniteLossError, Progress, TrainResult
from .training.rundir import RunDirectory
from .training.setup import prepare
from .training.tasks import TaskLoss

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Penalty = Callable[[nn.Module], torch.Tensor]
Metrics = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]

_log = logging.getLogger("peftkit.trainer")


class Trainer:
    """Train ``model`` (adapters applied, or any module with trainable parameters).

    loss_fn(model, batch) -> scalar replaces the default, which reads HF-style batches (see
    ``TrainConfig.task``). compute_metrics(predictions, labels) -> {name: value} adds metrics to
    evaluation (e.g. ``peftkit.metrics.classification_metrics``). regularizers are extra
    ``penalty(model)`` terms added to every step's loss (e.g. ``peftkit.losses.L2SP(model)``).
    collate_fn builds batches when ``fit`` gets a Dataset.
    """

    optimizer: torch.optim.Optimizer  # built by fit()
    _batch_size: int | None
    _per_epoch: int | None  # micro-batches per epoch for this process (None: unknown)
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        compute_metrics: Metrics | None = None,
        regularizers: Sequence[Penalty] = (),
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        # What the user asked for; ``config`` is it with the methods' defaults filled in (by fit).
        self.requested = config if config is not None else TrainConfig()
        self.config = self.requested
        self.raw = model
        self.model: nn.Module = model  # what is called: the model, or its DDP / compiled wrapper
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else TaskLoss(self.config.task)
        self.custom_loss = loss_fn is not None
        self.compute_metrics = compute_metrics
        self.regularizers = list(regularizers)
        self.collate_fn = collate_fn
        self.dist, self.device = distributed.setup(self.config.device)
        checks.check_precision(self.config, self.device)
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, float] = {}  # the last evaluation during fit
        out = Path(self.config.output_dir) if self.config.output_dir else None
        self.run_dir = RunDirectory(out, self.dist, self.config.save_total_limit)
        self.attack: EmbeddingAttack | None = None
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._fsdp2 = False  # the model is sharded with FSDP2 (set when fit prepares it)
        self._stop = StopRequest()  # Ctrl-C during fit (installed there)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.config.precision == "fp16"
        )

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, batches: Sequence[Any]) -> dict[str, Any]:
        """One optimiser step over ``batches`` (the micro-batches of gradient accumulation)."""
        start, n = time.perf_counter(), len(batches)
        tokens = sum(D.count_tokens(b) for b in batches)
        losses = []
        for i, batch in enumerate(batches):
            losses.append(self._backward(D.to_device(batch, self.device), n, last=i == n - 1))
        self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        loss, grad_norm, tokens = self._reduce(torch.stack(losses).mean(), norm, tokens)
        lr = float(self.scheduler.get_last_lr()[0])
        if self._finite(loss, grad_norm) and self._scaled_step():
            step_hooks(self.model, self.progress.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }

    def _backward(self, batch: Any, n: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (plus the adversarial pass when configured)."""
        sync = last and self.attack is None  # DDP all-reduces on the last backward of the step
        probe = self.attack.probe() if self.attack is not None else nullcontext()
        with self._no_sync(not sync), self._autocast(), probe:
            loss = self.loss_fn(self.model, batch)
            penalty = self._penalty()
            total = loss if penalty is None else loss + penalty
        self.scaler.scale(total / n).backward()
        if self.attack is not None:
            with self._no_sync(not last), self._autocast():
                adversarial = self.attack.loss(self.model, batch, self.loss_fn)
            self.scaler.scale(adversarial / n).backward()
        return loss.detach().float()

    def _scaled_step(self) -> bool:
        """Step through the gradient scaler; False when it skipped the step (fp16 overflow), so the
        methods' hooks never read those gradients. The scaler lowers its scale exactly then."""
        before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return before is None or self.scaler.get_scale() >= before

    def _penalty(self) -> torch.Tensor | None:
        """The methods' regularisers (``peftkit.regularizer``) plus the Trainer's ``regularizers``."""
        terms = [regularizer(self.model), *(r(self.raw) for r in self.regularizers)]
        present = [t for t in terms if t is not None]
        return torch.stack([t.float() for t in present]).sum() if present else None

    def _clip(self) -> torch.Tensor | None:
        if self.config.max_grad_norm is None:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        # FSDP2: the norm of DTensor gradients is over every shard; make it a plain tensor
        return _sharding.full(norm)

    def _reduce(
        self, loss: torch.Tensor, norm: torch.Tensor | None, tokens: int
    ) -> tuple[float, float | None, int]:
        """Loss averaged over processes, the gradient norm and all processes' tokens, and whether
        any process was interrupted (Ctrl-C): one sync."""
        zero = loss.new_zeros(())
        stop = zero + float(self._stop.requested)
        values = torch.stack([loss, zero if norm is None else norm.float(), zero + tokens, stop])
        mean_loss, grad_norm, mean_tokens, stopping = distributed.mean(values, self.dist).tolist()
        self._stop.agreed = stopping > 0
        return mean_loss, None if norm is None else grad_norm, round(mean_tokens * self.dist.world)

    def _finite(self, loss: float, grad_norm: float | None) -> bool:
        """Whether to apply the step; a non-finite loss raises or (configured) skips it.

        With fp16 the gradient scaler itself skips steps whose gradients overflow.
        """
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
        if math.isfinite(loss) and not (bad_norm and not self.scaler.is_enabled()):
            return True
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.config.on_nonfinite == "skip":
            self.progress.skipped += 1
            return False
        newest = self.run_dir.newest()  # every process gets here: the loss is reduced
        kept = newest[1] if newest else None
        raise NonFiniteLossError(
            f"step {self.progress.step + 1}: {what} is not finite; stopped before the update"
            f"{f' (last good checkpoint: {kept})' if kept else ''}. Lower lr, clip gradients "
            "(max_grad_norm), prefer bf16 to fp16, or set TrainConfig(on_nonfinite='skip')"
        )

    def _no_sync(self, skip_sync: bool) -> AbstractContextManager[Any]:
        """No gradient sync in the coming backward. DDP reads its context at forward time; FSDP2
        reads a switch in backward, so that is set here and stays until the next micro-batch."""
        if self._fsdp2:
            _sharding.set_gradient_sync(self.raw, not skip_sync)
            return nullcontext()
        return self._ddp.no_sync() if skip_sync and self._ddp is not None else nullcontext()

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- the run -----------------------------------------------------------------------------------
    def fit(
        self, train_data: Any, eval_data: Any = None, *, resume_from: str | Path | None = None
    ) -> TrainResult:
        """Train on ``train_data`` (a Dataset, a DataLoader or an iterable of batches).

        ``eval_data`` is evaluated as ``eval_every`` says. ``resume_from`` is a ``checkpoint-N``
        directory, or ``"latest"`` (the newest in ``output_dir``; a fresh start when there is none).
        """
        if self.config.patience is not None and eval_data is None:
            raise ValueError("early stopping (patience) needs eval_data")
        self._fill_defaults()
        checks.check_eval_data(self.config, eval_data)
        checks.check_output_dir(self.run_dir.path)
        spec, total = self._plan(train_data)
        checks.check_plan(self.raw, self.config, eval_data, total, self._per_epoch)
        was_training = self.raw.training
        self._start(total, resume_from)
        monitor = Monitor(
            total=total,
            initial=self.progress.step,
            progress=self.config.progress,
            main=self.dist.main,
            log_path=self.run_dir.log_path,
        )
        try:
            with StopRequest() as self._stop:
                stopped = self._loop(train_data, spec, eval_data, total, monitor)
        finally:
            self.raw.train(was_training)
            monitor.close()
            self.history.extend(monitor.history)
            if self.attack is not None:
                self.attack.remove()
                self.attack = None
        self._finish()
        p = self.progress
        return TrainResult(p.step, p.epoch, p.best_metric, p.best_step, stopped, dict(self.metrics))

    def _fill_defaults(self) -> None:
        """``config``: the requested one with what it leaves unset (lr) taken from the model's
        methods; said once on the main process (logged, and on stderr unless progress=False)."""
        self.config, line = defaults.resolve(self.raw, self.requested)
        if line is None or not self.dist.main:
            return
        _log.info(line)
        if self.config.progress:
            print(line, file=sys.stderr, flush=True)

    def _plan(self, train_data: Any) -> tuple[D.LoaderSpec | None, int]:
        """How the data is read, and the run's length in optimiser steps."""
        cfg = self.config
        spec = D.loader_spec(train_data, cfg.batch_size, True, self.collate_fn, cfg.num_workers)
        self._batch_size = spec.batch_size if spec is not None else None
        self._per_epoch = D.batches_per_epoch(spec, train_data, self.dist.world)
        return spec, self._total_steps(self._per_epoch)

    def _start(self, total: int, resume_from: str | Path | None) -> None:
        """Seed; load a checkpoint's weights; prepare the model; build the optimiser and schedule;
        then restore their state, the progress and the RNG states (last, so nothing disturbs them)."""
        S.seed_everything(self.config.seed + self.dist.rank)
        saved = self.run_dir.resume_path(resume_from)
        state = None
        if saved is not None:
            args = (self.raw, self.config, self._settings(), total)
            state = resume.open_checkpoint(self.run_dir, saved, *args)
        else:
            self.run_dir.start_fresh()
        prepared = prepare(self.raw, self.config, self.device, self.dist)
        self.model, self._ddp, self.attack = prepared.model, prepared.ddp, prepared.attack
        self._fsdp2 = prepared.fsdp2
        self.optimizer = build_optimizer(self.raw, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, total)
        self.progress = Progress()
        if state is not None:
            self._restore(state)

    def _total_steps(self, per_epoch: int | None) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        if per_epoch is None:
            raise ValueError("the training data has no length; set TrainConfig(max_steps=...)")
        if per_epoch == 0:
            raise ValueError("the training data is empty")
        return max(1, self.config.epochs * -(-per_epoch // self.config.grad_accum))

    def _loop(
        self, data: Any, spec: D.LoaderSpec | None, eval_data: Any, total: int, monitor: Monitor
    ) -> bool:
        """Epochs of optimiser steps until ``total`` steps or early stopping (then True)."""
        cfg, p = self.config, self.progress
        while p.step < total:
            seen = 0
            for group in D.groups(self._epoch_batches(data, spec), cfg.grad_accum):
                record = self.train_step(group)
                p.step, p.batch, seen = p.step + 1, p.batch + len(group), seen + 1
                self._report(record, monitor)
                evaluate, save = _due(cfg.eval_every, p.step), _due(cfg.save_every, p.step)
                if self._milestone(evaluate, save, eval_data, monitor):
                    return True
                if self._stop.due(self.dist):
                    self._interrupted()
                if p.step >= total:
                    break
            if seen == 0 and spec is None:
                checks.data_ran_out(p.step, total)
                break  # a one-shot iterable of batches is exhausted
            if p.step >= total and (self._per_epoch is None or p.batch < self._per_epoch):
                return False  # stopped mid-epoch by max_steps
            p.epoch, p.batch = p.epoch + 1, 0
            if self._milestone(
                cfg.eval_every == "epoch", cfg.save_every == "epoch", eval_data, monitor
            ):
                return True
        return False

    def _milestone(self, evaluate: bool, save: bool, eval_data: Any, monitor: Monitor) -> bool:
        """Evaluate and save as scheduled (in that order); True when early stopping says stop."""
        stop = False
        if evaluate and eval_data is not None:
            self.metrics, stop = self._evaluate_and_track(eval_data, monitor)
        if save:
            self.save_checkpoint()
        return stop

    def _epoch_batches(self, data: Any, spec: D.LoaderSpec | None) -> Iterable[Any]:
        p, seed = self.progress, self.config.seed
        D.announce_epoch(data if spec is None else spec.dataset, p.epoch)
        if spec is None:
            return D.skip(data, p.batch)
        sampler = D.ShardSampler(
            len(spec.dataset),
            shuffle=spec.shuffle,
            seed=seed,
            epoch=p.epoch,
            rank=self.dist.rank,
            world=self.dist.world,
            start=p.batch * spec.batch_size,
        )
        return D.build_loader(spec, sampler, seed=seed + p.epoch)

    def _report(self, record: dict[str, Any], monitor: Monitor) -> None:
        step = self.progress.step
        if step % self.config.log_every == 0:
            monitor.log({"step": step, "epoch": self.progress.epoch, **record})
        monitor.advance(
            1, {"loss": record["loss"], "lr": record["lr"], "tok/s": record["tokens_per_s"]}
        )

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, data: Any) -> dict[str, float]:
        """Mean loss (weighted by batch size) and ``compute_metrics`` over ``data``, all processes."""
        self.raw.to(self.device)
        cfg = self.config
        batches, sharded = evaluation.eval_batches(
            data,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            where=self.dist,
        )
        return evaluation.evaluate(
            self.model,
            batches,
            self.loss_fn if self.custom_loss else None,
            metrics=self.compute_metrics,
            autocast=self._autocast,
            task=cfg.task,
            device=self.device,
            gather=self.dist if sharded else None,
            even=_sharding.is_fsdp2(self.raw),
        )

    def _evaluate_and_track(self, data: Any, monitor: Monitor) -> tuple[dict[str, float], bool]:
        """Evaluate, log, keep the best adapter; True when early stopping says stop."""
        metrics = self.evaluate(data)
        p, cfg = self.progress, self.config
        monitor.log(
            {"step": p.step, "epoch": p.epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        )
        name = cfg.metric_for_best.removeprefix("eval_")
        if name not in metrics:
            raise ValueError(
                f"metric_for_best={cfg.metric_for_best!r} is not an eval metric; evaluation "
                f"gives {sorted(metrics)}"
            )
        if p.record_eval(metrics[name], cfg):
            self.run_dir.save_best(self.raw, p.step, metrics)
        return metrics, p.should_stop(cfg)

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``output_dir/checkpoint-<step>`` (adapter, optimiser, scheduler, scaler, RNG,
        progress); returns its path on the main process. Every process must call it."""
        state = {
            "format": S.CHECKSUM_FORMAT,
            "progress": dataclasses.asdict(self.progress),
            "optimizer": _sharding.full_optimizer_state(self.optimizer),  # FSDP2: gathered
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict(),
            **self._settings(),
            "config": self.config.to_dict(),
        }
        return self.run_dir.save(self.progress.step, self.raw, state)

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one for the data position to mean the same."""
        return {
            "world": self.dist.world,
            "grad_accum": self.config.grad_accum,
            "batch_size": self._batch_size,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        resume.check_same_parameters(state["optimizer"], self.optimizer)
        fresh = resume.fresh_hyperparameters(self.optimizer)  # the config's, not the checkpoint's
        self.optimizer.load_state_dict(state["optimizer"])
        _sharding.shard_optimizer_state(self.optimizer)  # FSDP2: this process's shards
        load_scheduler_state(self.scheduler, state["scheduler"])
        resume.apply_hyperparameters(self.optimizer, self.scheduler, fresh)
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        S.set_rng_state(state["rng"][self.dist.rank])

    def _interrupted(self) -> None:
        """After a Ctrl-C: save the step just taken (with output_dir) and raise KeyboardInterrupt."""
        saved = self._save_unless_saved()
        where = f"; saved {saved}, continue with fit(..., resume_from='latest')" if saved else ""
        raise KeyboardInterrupt(f"training interrupted after step {self.progress.step}{where}")

    def _save_unless_saved(self) -> Path | None:
        newest = self.run_dir.newest()
        if self.run_dir.path is not None and (newest is None or newest[0] != self.progress.step):
            return self.save_checkpoint()
        return newest[1] if newest is not None else None

    def _finish(self) -> None:
        self._save_unless_saved()
        if self.config.load_best_at_end:
            self.run_dir.load_best(self.raw)


def _due(every: int | str | None, step: int) -> bool:
    return isinstance(every, int) and step % every == 0
