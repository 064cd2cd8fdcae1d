"""Every registered method against the floor (and HF peft with ``--vs-peft``) on one model.

    python benchmarks/compare.py                 # embedded Llama-shaped model, CUDA if available
    python benchmarks/compare.py --vs-peft       # peft's LoRA, AdaLoRA and prefix tuning alongside
    python benchmarks/compare.py --model DIR     # a local HF causal LM instead
    python benchmarks/compare.py --smoke         # a seconds-long run on a tiny model

Figures per method: trainable parameters; training step time and tokens/s; peak training memory
above the model; inference tokens/s unmerged and merged. Each is also given as a ratio: step time and
memory to the *floor* (the frozen base with backward through every layer), inference to the base
model. Times are measured interleaved in one process (the order rotates every round, after warm-up)
and each ratio is the median of the per-round ratios. Memory on CUDA is ``max_memory_allocated``
after a reset; on CPU it is the peak RSS (``VmHWM``) of a fresh child process per method, minus the
RSS after the model was built. Output: a markdown table on stdout, a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from common import ModelSpec
from compare_report import Clocks, assemble, goals, mfu, peft_pairs, plot, print_report
from contestants import FLOOR, Contestant, Prepared, by_key, lineup
from torch import nn

CLOCK_HELP = "time figures from wall time (default) or process CPU time (shared CPU, 1 thread)"
# Dense bf16 peaks by the exact name torch.cuda.get_device_name reports: an H100 PCIe is not an SXM
# part, so no substring matching; any other device needs --peak-tflops for MFU.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L4": 121.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="a local HF causal-LM directory")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, help="sequences per batch (CPU 8, CUDA 8)")
    p.add_argument("--seq", type=int, help="tokens per sequence (CPU 256, CUDA 1024)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps per memory reading (default 3)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help=CLOCK_HELP)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--vs-peft", action="store_true", help="add HF peft's LoRA, AdaLoRA, prefix")
    p.add_argument("--only", nargs="+", metavar="KEY", help="restrict to these keys (floor kept)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU on CUDA")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds: a seconds-long run")
    p.add_argument("--child-memory", metavar="KEY", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and common.pick_device(args.device).type == "cuda":
        p.error("--clock cpu does not count CUDA work; use the default wall clock on CUDA")
    if args.smoke:
        args.rounds, args.warmup, args.mem_steps = 2, 1, 2
    return args


def settings(args: argparse.Namespace) -> tuple[ModelSpec, torch.device, torch.dtype, int, int]:
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    spec = common.SMOKE if args.smoke else (common.CUDA_DEFAULT if cuda else common.CPU_DEFAULT)
    if args.model:
        spec = ModelSpec(directory=args.model)
    batch = args.batch or (2 if args.smoke else 8)
    seq = args.seq or (16 if args.smoke else (1024 if cuda else 256))
    return spec, device, dtype, batch, seq


def chosen(args: argparse.Namespace) -> list[Contestant]:
    vs_peft = args.vs_peft and common.peft_available()
    if not args.only:
        return lineup(vs_peft)
    everyone = lineup(vs_peft, extras=True)
    unknown = set(args.only) - {c.key for c in everyone}
    if unknown:
        raise SystemExit(
            f"--only: unknown keys {sorted(unknown)}; known: {[c.key for c in everyone]}"
        )
    return [c for c in everyone if c.key == FLOOR or c.key in args.only]


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.rounds + args.mem_steps


# -- one training step -----------------------------------------------------------------------------
def step_fn(prep: Prepared, batch: torch.Tensor) -> Callable[[], None]:
    """One optimiser step: forward, loss (+ the method's regulariser), backward, AdamW, hooks."""
    opt = torch.optim.AdamW(prep.params, lr=1e-4) if prep.params else None
    counter = itertools.count()
    prep.model.train()

    def step() -> None:
        loss = prep.model(input_ids=batch, labels=batch, use_cache=False).loss
        reg = prep.regularizer()
        (loss if reg is None else loss + reg).backward()
        if opt is not None:
            opt.step()
            prep.after_step(next(counter))
            opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model: nn.Module, batch: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=batch, use_cache=False)

    return forward


def counts(prep: Prepared) -> dict[str, Any]:
    total = sum(p.numel() for p in {id(p): p for p in prep.model.parameters()}.values())
    trainable = sum(p.numel() for p in prep.params)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


# -- memory ----------------------------------------------------------------------------------------
def child_memory(args: argparse.Namespace) -> None:
    """In a fresh process: per key, build the model, then report the peak RSS of training above it.

    Prints one JSON object {key: reading}. Real runs give each child one key; ``--smoke`` gives one
    child every key (in turn, the peak reset before each), to keep the test suite fast.
    """
    spec, device, dtype, batch_size, seq = settings(args)
    out = {}
    for key in args.child_memory.split(","):
        model = common.build_model(spec, device, dtype)
        batch = common.make_batch(common.vocab_size(model), batch_size, seq, device)
        gc.collect()
        reset = common.reset_peak_rss()  # first: the peak is then never below the RSS read next
        model_rss = common.proc_status_bytes("VmRSS")
        step = step_fn(by_key(key).prepare(model, total_steps(args)), batch)
        for _ in range(args.mem_steps):
            step()
        peak = common.proc_status_bytes("VmHWM")
        # The kernel batches RSS counts per thread (up to 64 pages each), so a method that adds
        # nothing measurable can read a few hundred KiB below zero: that is 0.
        extra = max(0, peak - model_rss)
        out[key] = {"train_bytes": extra, "model_rss": model_rss, "reset": reset}
        del model, step
    print(json.dumps(out))


def child_command(args: argparse.Namespace, keys: list[str]) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", ",".join(keys)]
    cmd += ["--device", "cpu", "--dtype", args.dtype, "--mem-steps", str(args.mem_steps)]
    cmd += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--seq", str(args.seq)] if args.seq else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return cmd


def cpu_memory(args: argparse.Namespace, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Run ``child_memory`` in new interpreters (spawned, never forked from this one): one per key,
    one after another; with ``--smoke`` one for all keys."""
    # A fixed mmap threshold makes glibc return freed tensor memory at once, so RSS tracks tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}
    out: dict[str, dict[str, Any]] = {}
    for group in [keys] if args.smoke else [[key] for key in keys]:
        print(f"  memory: {', '.join(group)}", file=sys.stderr, flush=True)
        done = subprocess.run(child_command(args, group), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory child for {group} failed:\n{done.stderr[-3000:]}")
        out.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def cuda_memory(args: argparse.Namespace, contestant: Contestant) -> dict[str, Any]:
    """``max_memory_allocated`` over a few steps of a fresh model, minus the model's own bytes."""
    spec, device, dtype, batch_size, seq = settings(args)
    model = common.build_model(spec, device, dtype)
    batch = common.make_batch(common.vocab_size(model), batch_size, seq, device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    model_bytes = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = step_fn(contestant.prepare(model, total_steps(args)), batch)
    for _ in range(args.mem_steps):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step, model
    gc.collect()
    torch.cuda.empty_cache()
    return {"train_bytes": peak - model_bytes, "model_bytes": model_bytes}


def measure_memory(args: argparse.Namespace, line: list[Contestant]) -> dict[str, dict[str, Any]]:
    if common.pick_device(args.device).type != "cuda":
        return cpu_memory(args, [c.key for c in line])
    out = {}
    for c in line:
        print(f"  memory: {c.key}", file=sys.stderr, flush=True)
        out[c.key] = cuda_memory(args, c)
    return out


# -- time ------------------------------------------------------------------------------------------
def measure_time(
    args: argparse.Namespace, line: list[Contestant]
) -> tuple[dict[str, Any], Clocks, Clocks, dict[str, str]]:
    """Interleaved training steps of every contestant, then interleaved inference forwards."""
    spec, device, dtype, batch_size, seq = settings(args)
    template = common.build_model(spec, device, dtype)
    batch = common.make_batch(common.vocab_size(template), batch_size, seq, device)
    prepared = {c.key: c.prepare(copy.deepcopy(template), total_steps(args)) for c in line}
    info = {key: {**counts(p), "config": p.config} for key, p in prepared.items()}
    print("  timing training steps", file=sys.stderr, flush=True)
    steps = {key: step_fn(p, batch) for key, p in prepared.items()}
    train = common.interleaved(steps, args.rounds, args.warmup, device)
    del steps
    print("  timing inference", file=sys.stderr, flush=True)
    forwards, notes = inference_tasks(template, prepared, batch)
    infer = common.interleaved(forwards, args.rounds, args.warmup, device)
    return info, train, infer, notes


def inference_tasks(
    template: nn.Module, prepared: dict[str, Prepared], batch: torch.Tensor
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """Forwards of the base model, each trained model as it is, and a merged copy of each."""
    tasks = {"base": infer_fn(template, batch)}
    notes = {}
    for key, prep in prepared.items():
        if not prep.infer:
            continue
        tasks[f"{key}|unmerged"] = infer_fn(prep.model, batch)
        if prep.merged is not None:
            merged, notes[key] = prep.merged()
            if merged is not None:
                tasks[f"{key}|merged"] = infer_fn(merged, batch)
        else:
            notes[key] = "cannot merge"
    return tasks, notes


def peak_flops(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    if args.peak_tflops:
        return float(args.peak_tflops) * 1e12
    name = torch.cuda.get_device_name(device)
    half = dtype in (torch.bfloat16, torch.float16)
    found = PEAK_TFLOPS.get(name)
    return found * 1e12 if found and half else None


# -- main ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    spec, device, dtype, batch_size, seq = settings(args)
    line = chosen(args)
    if args.vs_peft and not common.peft_available():
        print("--vs-peft: peft is not installed (pip install peft); running without it\n")
    print(f"model: {spec.describe()}; batch {batch_size} × {seq} on {device} ({dtype})")
    memory = measure_memory(args, line)
    info, train, infer, notes = measure_time(args, line)
    rows = assemble(line, info, (train, infer), memory, notes, batch_size * seq, args.clock)
    peak = peak_flops(args, device, dtype)
    mfu(rows, rows[0]["total"], peak)
    pairs = peft_pairs(rows, train[args.clock])
    report = {
        "model": spec.describe(),
        "batch": batch_size,
        "seq": seq,
        "dtype": str(dtype),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "clock": args.clock,
        "environment": common.environment(device),
        "rows": rows,
        "vs_peft": pairs,
        "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in goals(rows, pairs)],
    }
    print_report(report, device.type == "cuda", peak)
    write_outputs(args, report, device)
    return report


def write_outputs(args: argparse.Namespace, report: dict[str, Any], device: torch.device) -> None:
    stem = f"compare-{device.type}" + ("-smoke" if args.smoke else "")
    json_path = args.out / f"{stem}.json"
    common.write_json(json_path, report)
    title = f"{report['model']}\nbatch {report['batch']} × {report['seq']}, {device}"
    png = plot(report["rows"], args.out / f"{stem}.png", title)
    print(f"\nwrote {json_path}" + (f" and {png}" if png else " (no plot: matplotlib missing)"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_memory:
        child_memory(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
