"""LoRA on a model DeepSpeed ZeRO-3 partitions, trained in a plain DeepSpeed loop.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero3.py --out out/ds
    DS_ACCELERATOR=cpu python examples/deepspeed_zero3.py --smoke    # one process, a few steps

Needs ``pip install "peftkit[deepspeed]"``; without DeepSpeed it says so and stops. On CUDA drop
``DS_ACCELERATOR=cpu`` (DeepSpeed then uses nccl instead of gloo).

Steps: a tiny Llama with random weights is built from a config and saved (the stand-in for a
pretrained checkpoint; nothing is downloaded). It is loaded with ``from_pretrained`` under
transformers' ``HfDeepSpeedConfig``, so every weight is partitioned by ``deepspeed.zero.Init`` as it
is created: on each process an empty tensor that keeps its full shape as ``ds_shape``. LoRA is
applied after that and sizes its factors from ``ds_shape``; ``deepspeed.initialize`` takes the LoRA
parameters (``peftkit.trainable_parameters``), and the loop is DeepSpeed's own (``engine.backward``,
``engine.step``). The adapter is gathered (``deepspeed.zero.GatheredParameters``) and saved by
``peftkit.save_adapter`` on rank 0, which then loads it onto an unsharded copy of the base in one
process and checks that its logits equal the ZeRO-3 model's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import peftkit

VOCAB = 64
TARGETS = ["q_proj", "v_proj", "up_proj"]


def ds_config(micro_batch: int) -> dict[str, Any]:
    """ZeRO-3 in fp32 with torch's AdamW (DeepSpeed's fused CPU Adam would compile an extension)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }


def save_base(directory: Path) -> None:
    """A tiny Llama with seeded random weights, saved as a pretrained checkpoint would be."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def apply_lora(model: nn.Module) -> None:
    torch.manual_seed(1)  # the same adapter initialisation on every process
    peftkit.apply_lora(model, r=4, alpha=8, targets=TARGETS)


def batches(steps: int, batch: int) -> list[torch.Tensor]:
    """``steps`` batches of sequences that count up in threes (mod VOCAB): a learnable task."""
    gen = torch.Generator().manual_seed(2)
    starts = torch.randint(VOCAB, (steps, batch, 1), generator=gen)
    return list((starts + 3 * torch.arange(12)) % VOCAB)


def probe() -> torch.Tensor:
    return batches(1, 3)[0].flip(-1)


def train(base: Path, out: Path, steps: int, micro_batch: int) -> dict[str, Any]:
    """Load ``base`` under ZeRO-3, apply LoRA, train; save the gathered adapter to ``out``."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    config = ds_config(micro_batch)
    keep = HfDeepSpeedConfig(config)  # while it lives, from_pretrained builds under zero.Init
    model = AutoModelForCausalLM.from_pretrained(base)
    weight = model.model.layers[0].self_attn.q_proj.weight
    report: dict[str, Any] = {"partitioned": list(weight.shape), "ds_shape": list(weight.ds_shape)}
    apply_lora(model)
    report["factors"] = {k: list(v.shape) for k, v in peftkit.adapter_state_dict(model).items()}
    params = peftkit.trainable_parameters(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    losses = []
    for ids in batches(steps, micro_batch * world):
        mine = ids[rank * micro_batch : (rank + 1) * micro_batch]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the loss over every process's micro-batch
        losses.append(float(mean) / world)
    engine.eval()
    with torch.no_grad():
        report["logits"] = engine(input_ids=probe()).logits
    with deepspeed.zero.GatheredParameters(params):  # every process; rank 0 writes
        if rank == 0:
            peftkit.save_adapter(model, out / "adapter")
    dist.barrier()
    del keep  # from here on, from_pretrained builds plain (unpartitioned) models again
    report["losses"] = losses
    return report


def reload_and_compare(base: Path, out: Path, logits: torch.Tensor) -> float:
    """The saved adapter on an unsharded copy of the base, in this process alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peftkit.load_adapter(model, out / "adapter")
    model.eval()
    with torch.no_grad():
        return float((model(input_ids=probe()).logits - logits).abs().max())


def start_one_process() -> None:
    """``--smoke`` without torchrun: the environment of a world of one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="3 steps")
    args = parser.parse_args()
    try:
        import deepspeed
    except ImportError:
        print('DeepSpeed is not installed: pip install "peftkit[deepspeed]"; nothing to run')
        sys.exit(0)
    start_one_process()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    out = args.out or Path(tempfile.mkdtemp(prefix="peftkit-ds-"))
    if dist.get_rank() == 0:
        save_base(out / "base")
    dist.barrier()
    report = train(out / "base", out, 3 if args.smoke else args.steps, args.micro_batch)
    if dist.get_rank() != 0:
        return
    print(
        f"q_proj.weight on this process: shape {report['partitioned']}, ds_shape "
        f"{report['ds_shape']}"
    )
    shapes = {k.rsplit(".", 1)[-1]: v for k, v in report["factors"].items() if "q_proj" in k}
    print(f"LoRA factors sized from ds_shape: {shapes}")
    losses = report["losses"]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    gap = reload_and_compare(out / "base", out, report.pop("logits"))
    assert gap < 1e-5, f"the reloaded adapter's logits differ by {gap}"
    print(
        f"saved {out / 'adapter'}; reloaded in one process: same logits (max difference {gap:.1e})"
    )
    (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
