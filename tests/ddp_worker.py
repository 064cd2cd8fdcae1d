"""Run by tests/test_trainer_distributed.py under torchrun (and in-process for the single run).

``run``: the Trainer (DDP) trains a LoRA'd TinyTransformer on a causal-LM task and writes this
process's adapter tensors and history to ``<out>/rank<r>.safetensors`` / ``history<r>.json``.
Under torchrun each process initialises its adapter with its own seed: DDP broadcasts rank 0's at
wrap, so the ranks still train one adapter (the one a single process with seed 0 trains).
``fsdp2_loop``: the hand-written FSDP2 loop of docs/trainer.md on the same model; writes the
gathered adapter tensors to ``<out>/fsdp2_rank<r>.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import peftkit
from peftkit import TrainConfig, Trainer

from trainer_data import lm_data, lora_transformer

STEPS = 4


def run(out: Path, batch_size: int, grad_accum: int = 1, seed: int = 0) -> Trainer:
    model = lora_transformer(seed)
    config = TrainConfig(
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=STEPS,
        lr=1e-2,
        task="causal_lm",
        output_dir=str(out / "run"),
        eval_every=2,
        save_every=2,
        progress=False,
    )
    trainer = Trainer(model, config, compute_metrics=peftkit.metrics.classification_metrics)
    trainer.fit(lm_data(40), eval_data=lm_data(7, seed=3))
    rank = trainer.dist.rank
    tensors = {k: v.detach().contiguous() for k, v in peftkit.adapter_state_dict(model).items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    record: dict[str, Any] = {"history": trainer.history, "world": trainer.dist.world}
    (out / f"history{rank}.json").write_text(json.dumps(record))
    return trainer


# FSDP2 records stream events even on CPU; torch.cpu.Stream gained record_event after torch 2.6.
FSDP2_ON_CPU = hasattr(torch, "cpu") and hasattr(getattr(torch.cpu, "Stream", None), "record_event")


def fsdp2_batches(rank: int, world: int) -> list[torch.Tensor]:
    """Each step's batch of 8 sequences, split evenly over the processes."""
    data = torch.stack(lm_data(24, seed=7))
    per = 8 // world
    return [data[8 * s + rank * per : 8 * s + (rank + 1) * per] for s in range(3)]


def fsdp2_loop(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = lora_transformer()  # apply adapters first: the wrappers are sharded with their blocks
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    for step, ids in enumerate(fsdp2_batches(dist.get_rank(), dist.get_world_size())):
        loss = peftkit.losses.causal_lm_loss(model(ids), ids)
        reg = peftkit.regularizer(model)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad()
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous()
        for k, v in peftkit.adapter_state_dict(model).items()
    }
    save_file(full, str(out / f"fsdp2_rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    # each process initialises its adapter with its own seed: DDP broadcasts rank 0's (seed 0)
    rank = int(os.environ["RANK"])
    run(Path(sys.argv[1]), batch_size=int(sys.argv[2]), grad_accum=int(sys.argv[3]), seed=rank)
    if FSDP2_ON_CPU:
        fsdp2_loop(Path(sys.argv[1]))  # reuses the process group the Trainer started
