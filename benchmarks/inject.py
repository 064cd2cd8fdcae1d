"""Time to apply each registered method to a 70B-parameter-shaped Llama on the meta device.

    python benchmarks/inject.py              # peftkit's methods (demo configs; LoRA: all-linear r=8)
    python benchmarks/inject.py --vs-peft    # and HF peft's twins: get_peft_model, with and
                                             # without low_cpu_mem_usage
    python benchmarks/inject.py --smoke      # a tiny config, one round

The model is built on the meta device (shapes only, no memory, no weights), so the figure is the cost
of injection itself: walking the module tree, choosing targets, creating and placing adapter layers.
Every round builds fresh models (untimed) and times each injection in a rotated order; the ratio is
the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from contestants import PEFT_TWINS, VARIANTS, demo_config
from torch import nn

import peftkit

# Llama-2-70B's shape.
LLAMA_70B = {
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
TINY = {**LLAMA_70B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def meta_model(shape: dict[str, int]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))


def injectors(vs_peft: bool) -> dict[str, Callable[[nn.Module], object]]:
    """Name -> a function that injects into a fresh model: every registered method, peft's twins."""
    out: dict[str, Callable[[nn.Module], object]] = {}
    for name in [*peftkit.methods(), *VARIANTS]:
        config = demo_config(name, total_steps=1000)
        out[f"peftkit {name}"] = lambda model, config=config: peftkit.apply(model, config)
    if vs_peft:
        from peft import get_peft_model

        for name, make in PEFT_TWINS.items():
            config = make(1000)
            out[f"peft {name}"] = lambda model, config=config: get_peft_model(model, config)
            out[f"peft {name} (low_cpu_mem_usage)"] = lambda model, config=config: get_peft_model(
                model, config, low_cpu_mem_usage=True
            )
    return out


def measure(
    shape: dict[str, int], tasks: dict[str, Callable[[nn.Module], object]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per injection, rotated order each round; methods that fail are reported, not timed."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    failed: dict[str, str] = {}
    names = list(tasks)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in failed:
                continue
            model = meta_model(shape)
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            try:
                tasks[name](model)
            except Exception as err:  # a method that cannot work on meta tensors says why
                failed[name] = f"{type(err).__name__}: {err}"[:200]
                continue
            finally:
                gc.enable()
            times[name].append(time.perf_counter() - start)
    return {k: v for k, v in times.items() if v}, failed


def ratios(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """peftkit / peft per method, against peft's default call and its low_cpu_mem_usage variant."""
    out = []
    for name in peftkit.methods():
        ours = times.get(f"peftkit {name}")
        for variant in (f"peft {name}", f"peft {name} (low_cpu_mem_usage)"):
            theirs = times.get(variant)
            if ours and theirs:
                out.append(
                    {"peftkit": name, "peft": variant, "ratio": common.median_ratio(ours, theirs)}
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vs-peft", action="store_true", help="add HF peft's twins")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    p.add_argument("--smoke", action="store_true", help="tiny config, one round")
    args = p.parse_args(argv)
    shape = TINY if args.smoke else LLAMA_70B
    rounds = 1 if args.smoke else args.rounds
    vs_peft = args.vs_peft and common.peft_available()
    if args.vs_peft and not vs_peft:
        print("--vs-peft: peft is not installed (pip install peft); running without it\n")
    n_params = sum(p.numel() for p in meta_model(shape).parameters())
    print(f"Llama-shaped model on the meta device: {n_params / 1e9:.2f}B parameters, {shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, failed = measure(shape, injectors(vs_peft), rounds)
    rows = [[name, f"{1000 * statistics.median(t):.1f}"] for name, t in times.items()]
    rows += [[name, f"failed: {why}"] for name, why in failed.items()]
    print(f"\nmedian of {rounds} rounds\n")
    print(common.markdown_table(["injection", "ms"], rows))
    pairs = ratios(times)
    if pairs:
        body = [[x["peftkit"], x["peft"], common.fmt_ratio(x["ratio"])] for x in pairs]
        print("\n" + common.markdown_table(["peftkit", "vs", "time ratio"], body))
    report = {
        "shape": shape,
        "parameters": n_params,
        "rounds": rounds,
        "environment": common.environment(torch.device("cpu")),
        "times_s": times,
        "failed": failed,
        "ratios": pairs,
    }
    path = args.out / ("inject-smoke.json" if args.smoke else "inject.json")
    common.write_json(path, report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
