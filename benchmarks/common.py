"""Shared pieces of the benchmark scripts: models, devices, timing, memory readings, tables.

The scripts run as ``python benchmarks/<name>.py``; Python puts this folder on ``sys.path``, so they
import this module by its bare name. Nothing in ``src/`` or ``tests/`` imports it.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.summary import markdown_table as markdown_table  # the scripts print tables with it

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# -- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A Llama-shaped causal LM built from a config (random weights), or a local HF directory."""

    layers: int = 4
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8000
    directory: str | None = None

    def describe(self) -> str:
        if self.directory:
            return f"local model {self.directory}"
        return (
            f"embedded Llama-shaped LM: {self.layers} layers, hidden {self.hidden}, "
            f"intermediate {self.intermediate}, {self.heads} heads ({self.kv_heads} kv), "
            f"vocab {self.vocab}, random weights"
        )


CPU_DEFAULT = ModelSpec()
CUDA_DEFAULT = ModelSpec(
    layers=16, hidden=2048, intermediate=5632, heads=16, kv_heads=8, vocab=32000
)
SMOKE = ModelSpec(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256)


def build_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The model ``spec`` describes, in eval mode, on ``device`` in ``dtype`` (same seed, same weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model: nn.Module
    if spec.directory:
        model = AutoModelForCausalLM.from_pretrained(
            spec.directory, local_files_only=True, dtype=dtype
        )
    else:
        config = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval()


def vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def make_batch(
    vocab: int, batch: int, seq: int, device: torch.device, seed: int = 1
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, seq), generator=gen).to(device)


# -- devices ---------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build sees no CUDA device; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to judge the figures: versions, threads, processor, commit."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpus_online": os.cpu_count(),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("transformers", "peft"):
        info[package] = _version_of(package)
    return info


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def peft_available() -> bool:
    from importlib.util import find_spec

    return find_spec("peft") is not None


# -- timing ----------------------------------------------------------------------------------------
def interleaved(
    tasks: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each task, by clock: ``{"wall": {name: [...]}, "cpu": {...}}``.

    Rounds run every task once, in an order rotated every round, after ``warmup`` untimed rounds.
    Interleaving puts every contestant under the same background load, so ratios taken within a round
    cancel most of the noise of a shared machine. "cpu" is the process's CPU time: on a machine
    shared with other jobs it counts the work done rather than the time spent waiting for a core
    (meaningful with one torch thread; CUDA work is not counted in it).
    """
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
    sync(device)
    times: dict[str, dict[str, list[float]]] = {
        clock: {name: [] for name in names} for clock in ("wall", "cpu")
    }
    # Collections run between timed calls, with gc off inside them; freezing what exists now keeps
    # each collection down to the objects made since.
    gc.collect()
    gc.freeze()
    try:
        _timed_rounds(tasks, rounds, device, times)
    finally:
        gc.unfreeze()
    return times


def _timed_rounds(
    tasks: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    times: dict[str, dict[str, list[float]]],
) -> None:
    names = list(tasks)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            gc.disable()
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                tasks[name]()
                sync(device)
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.process_time() - cpu)
            finally:
                gc.enable()


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio ``num[i] / den[i]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


# -- memory ----------------------------------------------------------------------------------------
def proc_status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` style field of /proc/self/status, in bytes (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


# -- output ----------------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}×"


def fmt_int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"
