"""LoRA applied after ``deepspeed.zero.Init`` (ZeRO-3, DeepSpeed's CPU accelerator, two gloo
processes), through examples/deepspeed_zero3.py: the factors have the full logical shapes, a
DeepSpeed loop trains them (the loss falls, and matches one unsharded process on the combined
batch), and the gathered adapter equals that unsharded twin's and reloads in one process with the
ZeRO-3 model's logits. Runs in ``nox -s distributed``, which installs DeepSpeed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

import peftkit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "deepspeed_zero3.py"
STEPS, MICRO_BATCH, WORLD = 6, 2, 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason='DeepSpeed is not installed (pip install "peftkit[deepspeed]"; nox -s distributed)',
    ),
]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deepspeed_zero3", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _twin(example: ModuleType, base: Path) -> tuple[torch.nn.Module, list[float]]:
    """The same base and LoRA in one unsharded process, trained with torch's AdamW on the
    batches both processes took together."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    example.apply_lora(model)
    optimizer = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    losses = []
    for ids in example.batches(STEPS, MICRO_BATCH * WORLD):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return model, losses


def test_lora_after_zero3_init_trains_under_deepspeed(tmp_path: Path, one_thread: None) -> None:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc_per_node={WORLD}",
        *(str(EXAMPLE), "--out", str(tmp_path)),
        *("--steps", str(STEPS), "--micro-batch", str(MICRO_BATCH)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "reloaded in one process: same logits" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["partitioned"] == [0] and report["ds_shape"] == [64, 64]  # really ZeRO-3
    example = _example()
    twin, twin_losses = _twin(example, tmp_path / "base")
    expected = {k: list(v.shape) for k, v in peftkit.adapter_state_dict(twin).items()}
    assert report["factors"] == expected  # the full logical shapes, not the empty partitions

    losses = report["losses"]
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(twin_losses, rel=1e-4)
    saved = load_file(str(tmp_path / "adapter" / "peftkit_model.safetensors"))
    for key, value in peftkit.adapter_state_dict(twin).items():
        assert torch.allclose(saved[key], value, atol=1e-5), key
