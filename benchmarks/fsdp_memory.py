"""Memory per process under FSDP2: base weights, adapter and optimiser state held by each rank.

    python benchmarks/fsdp_memory.py [--worlds 1 2 4] [--layers 4] [--hidden 256]
    python benchmarks/fsdp_memory.py --smoke     # worlds 1 and 2, a tiny model; the suite runs this
    DS_ACCELERATOR=cpu python benchmarks/fsdp_memory.py --engine deepspeed   # ZeRO-3 (deepspeed extra)

For each world size it launches that many CPU processes (torchrun, gloo); each applies LoRA to the
same Llama-shaped model (random weights), lets the Trainer shard it (``distributed="fsdp2"``, per
``LlamaDecoderLayer``) and takes one optimiser step. Then every rank counts the bytes of the shards
it holds: frozen base parameters, adapter parameters and AdamW state. Printed: the largest rank's
figures per world size (bookkeeping of tensors, not process RSS; the gathers of a forward are
transient and not counted). With ``--engine deepspeed`` the model is built under
``deepspeed.zero.Init`` instead, LoRA applied after it, and the step taken through
``deepspeed.initialize``; the counts are each rank's ZeRO-3 partitions (``ds_tensor``) and the
AdamW state of its flat fp32 partition.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _local_bytes(tensor: torch.Tensor) -> int:
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard on this rank
    return int(local.numel() * local.element_size())


def _model(layers: int, hidden: int) -> nn.Module:
    """The Llama-shaped model; built under ``zero.Init`` while an ``HfDeepSpeedConfig`` of ZeRO-3
    lives (``from_config`` is where transformers applies it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def worker(out: Path, layers: int, hidden: int) -> None:
    import peftkit

    dist.init_process_group("gloo")
    model = _model(layers, hidden)
    peftkit.apply_lora(model, r=8, targets="all-linear")
    config = peftkit.TrainConfig(
        distributed="fsdp2", max_steps=1, batch_size=2, task="causal_lm", progress=False
    )
    trainer = peftkit.Trainer(model, config)
    ids = torch.randint(256, (8, 16), generator=torch.Generator().manual_seed(0))
    trainer.fit(list(ids))
    adapter = {id(p) for p in peftkit.trainable_parameters(model)}
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    figures = {
        "base": sum(_local_bytes(p) for p in model.parameters() if id(p) not in adapter),
        "adapter": sum(_local_bytes(p) for p in model.parameters() if id(p) in adapter),
        "optimizer": sum(_local_bytes(t) for t in state if isinstance(t, torch.Tensor)),
    }
    _write_worst(out, figures)


def deepspeed_worker(out: Path, layers: int, hidden: int) -> None:
    """The same model under DeepSpeed ZeRO-3 (CPU accelerator): built under ``zero.Init``, LoRA
    applied after it, one step through ``deepspeed.initialize``; each rank's partitions counted."""
    import deepspeed

    import peftkit

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(config)  # while it lives, transformers builds under zero.Init
    model = _model(layers, hidden)
    del keep
    assert all(p.numel() == 0 or dist.get_world_size() == 1 for p in model.parameters())
    peftkit.apply_lora(model, r=8, targets="all-linear")
    params = peftkit.trainable_parameters(model)
    engine, optimizer, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config=config
    )
    ids = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    adapter = {id(p) for p in params}
    state = [t for s in optimizer.optimizer.state.values() for t in s.values()]
    figures = {
        "base": sum(_local_bytes(p.ds_tensor) for p in model.parameters() if id(p) not in adapter),
        "adapter": sum(_local_bytes(p.ds_tensor) for p in model.parameters() if id(p) in adapter),
        "optimizer": sum(_local_bytes(t) for t in state if isinstance(t, torch.Tensor)),
    }
    _write_worst(out, figures)


def _write_worst(out: Path, figures: dict[str, int]) -> None:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, figures)
    if dist.get_rank() == 0:
        worst = {k: max(f[k] for f in everyone) for k in figures}
        out.write_text(json.dumps(worst))
    dist.destroy_process_group()


def measure(world: int, layers: int, hidden: int, engine: str = "fsdp2") -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={world}", __file__, "--worker", str(out)]
        command += ["--layers", str(layers), "--hidden", str(hidden), "--engine", engine]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"world {world} failed:\n{done.stderr[-3000:]}")
        figures: dict[str, int] = json.loads(out.read_text())
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--engine", choices=["fsdp2", "deepspeed"], default="fsdp2")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        run = deepspeed_worker if args.engine == "deepspeed" else worker
        run(args.worker, args.layers, args.hidden)
        return
    worlds, layers, hidden = (
        ([1, 2], 2, 64) if args.smoke else (args.worlds, args.layers, args.hidden)
    )
    print(f"{args.engine}: Llama-shaped, {layers} layers, hidden {hidden}, LoRA r=8 on all linear")
    print("world  base KiB/rank  adapter KiB/rank  optimiser KiB/rank")
    rows = {}
    for world in worlds:
        f = measure(world, layers, hidden, args.engine)
        rows[world] = f
        print(
            f"{world:5d}  {f['base'] / 1024:13.1f}  {f['adapter'] / 1024:16.1f}  "
            f"{f['optimizer'] / 1024:18.1f}"
        )
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
