"""QLoRA: LoRA on a bitsandbytes 4-bit (nf4, double quant) base, against LoRA on the same model in
full precision and against HF peft's LoRA on the same 4-bit base, in one run.

    python benchmarks/qlora.py                 # CPU: embedded Llama-shaped model, random weights
    python benchmarks/qlora.py --device cuda   # adds MFU (--peak-tflops), CUDA peak memory
    python benchmarks/qlora.py --smoke         # seconds: a tiny model, 2 rounds

Step time: every contestant in this process, interleaved round by round (medians, and the median
per-round ratio to peftkit's full-precision LoRA). Peak memory: each contestant in a sibling process
(CPU: VmHWM, the peak resident set, which includes the loaded libraries; CUDA:
max_memory_allocated), and the bytes of the weights as stored. MFU counts 4·N·tokens per step,
N the base's parameters: with a frozen base a step computes the forward (2N) and the input
gradients (2N) but no weight gradients (the 6N convention would count those).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from torch import nn

CONTESTANTS = ("lora-full-precision", "lora-4bit", "peft-lora-4bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    p.add_argument("--out", type=Path, default=common.RESULTS / "qlora.json")
    p.add_argument("--child", metavar="KEY", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def spec(args: argparse.Namespace) -> common.ModelSpec:
    if args.smoke:
        return common.SMOKE
    if torch.device(args.device).type == "cuda":
        return common.CUDA_DEFAULT
    return common.CPU_DEFAULT


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(key: str, directory: str, device: torch.device) -> nn.Module:
    """The contestant's model with its LoRA (r=16, all linear layers but the head)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kw: dict[str, Any] = {"dtype": dtype, "device_map": str(device)}
    if key != "lora-full-precision":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, **kw)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if key == "peft-lora-4bit":
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
        return peft.get_peft_model(model, config)  # type: ignore[no-any-return]
    import peftkit

    peftkit.apply_lora(model, r=16, alpha=32, targets=targets)
    return model  # type: ignore[no-any-return]


def step_fn(model: nn.Module, batch: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child(args: argparse.Namespace) -> None:
    """Peak memory of one contestant: load, then a few steps, in this fresh process."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = load(args.child, args.model_dir, device)
    batch = common.make_batch(common.vocab_size(model), args.batch, args.seq, device)
    step = step_fn(model, batch)
    for _ in range(3):
        step()
    common.sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = common.proc_status_bytes("VmHWM")
    print(json.dumps({"peak_bytes": peak}))


def memory(args: argparse.Namespace, keys: list[str], directory: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in keys:
        cmd = [sys.executable, __file__, "--child", key, "--model-dir", directory]
        cmd += ["--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[key] = int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])
    return out


def available() -> list[str]:
    keys = list(CONTESTANTS)
    if not common.peft_available():
        keys.remove("peft-lora-4bit")
    return keys


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (4-bit weights packed, two per byte;
    bitsandbytes' per-block scales are not tensors of the module and are left out)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def report(
    args: argparse.Namespace, keys: list[str], directory: str, n_base: int
) -> dict[str, Any]:
    device = torch.device(args.device)
    models = {key: load(key, directory, device) for key in keys}
    batch = common.make_batch(common.vocab_size(models[keys[0]]), args.batch, args.seq, device)
    weights = {key: _weight_bytes(model) for key, model in models.items()}
    tasks = {key: step_fn(model, batch) for key, model in models.items()}
    times = common.interleaved(tasks, args.rounds, args.warmup, device)["wall"]
    del models, tasks
    peaks = memory(args, keys, directory)
    tokens = args.batch * args.seq
    rows = {}
    for key in keys:
        median = statistics.median(times[key])
        row: dict[str, Any] = {
            "step_s": median,
            "step_ratio": common.median_ratio(times[key], times["lora-full-precision"]),
            "peak_mib": common.mib(peaks[key]),
            "peak_ratio": peaks[key] / peaks["lora-full-precision"],
            "weights_mib": common.mib(weights[key]),
            "tokens_per_s": tokens / median,
        }
        if args.peak_tflops:
            row["mfu"] = 4 * n_base * tokens / median / (args.peak_tflops * 1e12)
        rows[key] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    device = torch.device(args.device)
    if args.smoke:
        args.rounds, args.warmup, args.batch, args.seq = 2, 1, 2, 16
    keys = available()
    with tempfile.TemporaryDirectory() as tmp:
        base = common.build_model(spec(args), torch.device("cpu"), torch.float32)
        n_base = sum(p.numel() for p in base.parameters())
        base.save_pretrained(tmp)
        del base
        rows = report(args, keys, tmp, n_base)
    env = common.environment(device)
    env["bitsandbytes"] = common._version_of("bitsandbytes")
    result = {"model": spec(args).describe(), "batch": args.batch, "seq": args.seq,
              "rounds": args.rounds, "mfu_convention": "4·N·tokens (frozen base)",
              "environment": env, "contestants": rows}  # fmt: skip
    common.write_json(args.out, result)
    header = ["contestant", "step (s)", "× full-precision", "peak MiB", "× full-precision"]
    header.append("weights MiB")
    if args.peak_tflops:
        header.append("MFU (4·N·tokens)")
    table = []
    for key, row in rows.items():
        line = [key, f"{row['step_s']:.3f}", f"{row['step_ratio']:.2f}", f"{row['peak_mib']:.0f}"]
        line += [f"{row['peak_ratio']:.2f}", f"{row['weights_mib']:.0f}"]
        if args.peak_tflops:
            line.append(f"{100 * row['mfu']:.1f}%")
        table.append(line)
    print(f"{spec(args).describe()}; batch {args.batch} × seq {args.seq}; {env['device']}")
    print(common.markdown_table(header, table))


if __name__ == "__main__":
    main()
