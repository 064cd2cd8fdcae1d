"""Run by tests/test_trainer_fsdp2.py under torchrun (two gloo processes), and in-process for the
one-process reference.

``train``: the Trainer on a LoRA'd TinyTransformer the caller sharded with ``fully_shard`` (each
block, then the root), with gradient accumulation and active clipping; every process calls
``save_adapter`` on the sharded model, and rank 0 writes the history and the sharded model's logits
on a probe batch. The torchrun job trains once through, then resumes from the middle checkpoint of
that run in a fresh sharded model and trains to the end again. It trains with
``distributed="fsdp2"`` (the Trainer shards) from a different initialisation on each process. Last,
an eval set that does not split evenly over the processes is refused, and so is a model the
caller sharded after initialising its adapter with a different seed on each process (unless one
saved adapter is loaded on every process first).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import TrainConfig, Trainer

from trainer_data import lm_data, lora_transformer

STEPS = 4

# FSDP2 records stream events even on CPU; torch.cpu.Stream gained record_event after torch 2.6.
FSDP2_ON_CPU = hasattr(torch, "cpu") and hasattr(getattr(torch.cpu, "Stream", None), "record_event")


def probe() -> torch.Tensor:
    return torch.stack(lm_data(3, seed=11))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    return model


def config(out: Path, batch_size: int, grad_accum: int, **fields: Any) -> TrainConfig:
    return TrainConfig(
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=STEPS,
        lr=1e-2,
        max_grad_norm=0.05,  # below the gradient norms of this run: clipping acts on every step
        task="causal_lm",
        output_dir=str(out),
        eval_every=2,
        save_every=2,
        progress=False,
        **fields,
    )


def train(
    out: Path,
    *,
    sharded: bool,
    batch_size: int,
    grad_accum: int,
    resume_from: Path | None = None,
    seed: int = 0,
    model: nn.Module | None = None,
    **fields: Any,
) -> Trainer:
    if model is None:
        model = lora_transformer(seed)
        if sharded:
            shard(model)
    trainer = Trainer(model, config(out / "run", batch_size, grad_accum, **fields))
    trainer.fit(lm_data(40), eval_data=lm_data(8, seed=3), resume_from=resume_from)
    peftkit.save_adapter(model, out / "adapter")  # every process: shards are gathered
    with torch.no_grad():
        logits = model(probe())
    if trainer.dist.main:
        record: dict[str, Any] = {"history": trainer.history, "world": trainer.dist.world}
        (out / "history.json").write_text(json.dumps(record))
        torch.save(logits, out / "logits.pt")
    return trainer


def mixed_inits(root: Path, rank: int) -> None:
    """The user shards adapters each process initialised with its own seed: refused on every
    process before a step. Loading one saved adapter on every process before sharding fixes it."""
    model = shard(lora_transformer(seed=rank))
    try:
        Trainer(model, config(root / "mixed", batch_size=2, grad_accum=1)).fit(lm_data(8))
    except ValueError as err:
        (root / f"mixed_inits{rank}.txt").write_text(str(err))
    model = lora_transformer(seed=rank)
    saved = load_file(str(root / "full" / "adapter" / "peftkit_model.safetensors"))
    peftkit.load_adapter_state_dict(model, saved)
    train(root / "loaded", sharded=True, batch_size=2, grad_accum=2, model=shard(model))


if __name__ == "__main__":
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    train(root / "full", sharded=True, batch_size=2, grad_accum=2)
    middle = root / "full" / "run" / "checkpoint-2"
    rank = int(os.environ["RANK"])  # a different model on each process: rank 0's is broadcast
    by_trainer = {"distributed": "fsdp2", "shard_modules": ("Block",)}
    train(root / "self", sharded=False, batch_size=2, grad_accum=2, seed=rank, **by_trainer)
    trainer = train(root / "resumed", sharded=True, batch_size=2, grad_accum=2, resume_from=middle)
    try:  # 5 examples: 3 for rank 0 (2 batches), 2 for rank 1 (1 batch)
        trainer.evaluate(lm_data(5))
    except ValueError as err:  # raised on every process, before any forward
        if trainer.dist.main:
            (root / "uneven_eval.txt").write_text(str(err))
    mixed_inits(root, rank)
