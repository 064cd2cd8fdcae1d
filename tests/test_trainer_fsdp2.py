"""The Trainer, save_adapter and friends on a model sharded with FSDP2 (``fully_shard``).

In one process (a world of one gloo process, so the parameters are DTensors): saving gathers full
tensors, loading keeps the shard, merge and export refuse. Under torchrun with two gloo processes:
training matches one process on the combined batch, the checkpoints reload in one unsharded
process with identical outputs, and a run resumed from its middle checkpoint is bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import fsdp_worker
import peftkit
from peftkit import TrainConfig, Trainer

from trainer_data import lm_data, lora_transformer

HERE = Path(__file__).resolve().parent
WEIGHTS = "peftkit_model.safetensors"

needs_fsdp2 = pytest.mark.skipif(
    not (dist.is_available() and fsdp_worker.FSDP2_ON_CPU),
    reason=f"FSDP2 on CPU needs CPU stream events, which torch {torch.__version__} lacks",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def world_of_one(one_thread: None) -> Iterator[None]:
    """A gloo process group of this process alone, destroyed afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded() -> nn.Module:
    return fsdp_worker.shard(lora_transformer())


def _fresh_from(path: Path) -> nn.Module:
    """The same base in one unsharded process, with the adapter loaded from ``path``."""
    model = lora_transformer()
    peftkit.delete_adapter(model, "default")
    peftkit.load_adapter(model, path)
    return model


@needs_fsdp2
def test_save_adapter_gathers_full_tensors_that_reload_unsharded(
    world_of_one: None, tmp_path: Path
) -> None:
    model = _sharded()
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.1)  # lora_B starts at zero: make the adapter count
        expected = model(fsdp_worker.probe())
    peftkit.save_adapter(model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / WEIGHTS))
    shapes = {k: v.shape for k, v in peftkit.adapter_state_dict(lora_transformer()).items()}
    assert {k: v.shape for k, v in saved.items()} == shapes
    with torch.no_grad():
        assert torch.equal(_fresh_from(tmp_path / "a")(fsdp_worker.probe()), expected)


@needs_fsdp2
def test_loading_into_a_sharded_model_keeps_each_shard(world_of_one: None, tmp_path: Path) -> None:
    source = lora_transformer()
    with torch.no_grad():
        for p in peftkit.trainable_parameters(source):
            p.normal_()
        expected = source(fsdp_worker.probe())
    peftkit.save_adapter(source, tmp_path / "a")
    model = _sharded()
    tensors = load_file(str(tmp_path / "a" / WEIGHTS))
    peftkit.load_adapter_state_dict(model, tensors)
    with torch.no_grad():
        assert torch.equal(model(fsdp_worker.probe()), expected)


@needs_fsdp2
@pytest.mark.parametrize("operation", ["merge", "merge_and_unload"])
def test_merge_refuses_a_sharded_model(world_of_one: None, operation: str) -> None:
    with pytest.raises(ValueError, match=rf"{operation} needs the full weights, but the model is"):
        getattr(peftkit, operation)(_sharded())


@needs_fsdp2
def test_export_peft_refuses_a_sharded_model(world_of_one: None, tmp_path: Path) -> None:
    from peftkit.interop import export_peft

    with pytest.raises(ValueError, match="export_peft needs the full weights.*unsharded copy"):
        export_peft(_sharded(), tmp_path / "p")


@needs_fsdp2
def test_the_trainer_trains_a_sharded_model_as_one_process_does(
    world_of_one: None, tmp_path: Path
) -> None:
    sharded, plain = _sharded(), lora_transformer()
    for model, name in ((sharded, "sharded"), (plain, "plain")):
        config = fsdp_worker.config(tmp_path / name, batch_size=4, grad_accum=2)
        Trainer(model, config).fit(lm_data(16))
    with torch.no_grad():
        ids = fsdp_worker.probe()
        assert torch.allclose(sharded(ids), plain(ids), atol=1e-6)
    saved = load_file(str(tmp_path / "sharded" / "checkpoint-4" / WEIGHTS))
    for key, value in peftkit.adapter_state_dict(plain).items():
        assert torch.allclose(saved[key], value, atol=1e-6), key


@needs_fsdp2
def test_two_processes_match_one_and_resume_bit_identically(
    tmp_path: Path, one_thread: None
) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "fsdp_worker.py"),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fsdp_worker.train(tmp_path / "single", sharded=False, batch_size=8, grad_accum=1)

    two = json.loads((tmp_path / "full" / "history.json").read_text())
    one = json.loads((tmp_path / "single" / "history.json").read_text())
    assert two["world"] == 2
    for a, b in zip(one["history"], two["history"], strict=True):
        for name in ("loss", "grad_norm", "eval_loss"):  # grad_norm: over both processes' shards
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5), name
    full = load_file(str(tmp_path / "full" / "adapter" / WEIGHTS))
    single = load_file(str(tmp_path / "single" / "adapter" / WEIGHTS))
    for key, value in single.items():
        assert torch.allclose(full[key], value, atol=1e-6), key

    logits = torch.load(tmp_path / "full" / "logits.pt")
    for saved in ("adapter", "run/checkpoint-4"):
        with torch.no_grad():
            assert torch.equal(_fresh_from(tmp_path / "full" / saved)(fsdp_worker.probe()), logits)

    resumed = load_file(str(tmp_path / "resumed" / "adapter" / WEIGHTS))
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    tail = json.loads((tmp_path / "resumed" / "history.json").read_text())["history"]
    shared = ("step", "epoch", "loss", "lr", "grad_norm", "eval_loss")
    assert [{k: r.get(k) for k in shared} for r in tail] == [
        {k: r.get(k) for k in shared} for r in two["history"][-len(tail) :]
    ]
    assert tail[0]["step"] == 3
    # distributed="fsdp2": rank 0's init is broadcast before the Trainer shards per Block
    by_trainer = load_file(str(tmp_path / "self" / "adapter" / WEIGHTS))
    assert all(torch.equal(by_trainer[k], full[k]) for k in full)
    uneven = (tmp_path / "uneven_eval.txt").read_text()
    assert "under FSDP2 every process must evaluate as many batches" in uneven
    assert "[2, 1] batches per process" in uneven
    # sharded by the caller after seeding each process differently: refused on every process
    for rank in (0, 1):
        refused = (tmp_path / f"mixed_inits{rank}.txt").read_text()
        assert refused.startswith(
            "the 2 processes hold different values of 4 adapter tensor(s) (default.layers.0.q_proj.lora_A, "
        )
        assert "Seed every process the same before apply_*" in refused
        assert "or let the Trainer shard: TrainConfig(distributed='fsdp2')" in refused
    assert not (tmp_path / "mixed" / "checkpoint-4").exists()
    # the fix named there, one saved adapter loaded before sharding: trains as the first run did
    assert (tmp_path / "loaded" / "run" / "checkpoint-4").is_dir()


# -- distributed="fsdp2": the Trainer shards -------------------------------------------------------
def test_fsdp2_settings_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="shard_modules names the blocks to shard; it needs"):
        TrainConfig(shard_modules=("Block",))
    with pytest.raises(ValueError, match="shard_modules must be a tuple of module class names"):
        TrainConfig(distributed="fsdp2", shard_modules="Block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision='fp16' is not supported.*use precision='bf16'"):
        TrainConfig(distributed="fsdp2", precision="fp16")
    with pytest.raises(ValueError, match="distributed must be one of"):
        TrainConfig(distributed="fsdp")  # type: ignore[arg-type]


def test_fsdp2_without_a_process_group_says_to_use_torchrun() -> None:
    config = TrainConfig(distributed="fsdp2", shard_modules=("Block",), max_steps=1, progress=False)
    with pytest.raises(ValueError, match="distributed='fsdp2' needs a process group: run"):
        Trainer(lora_transformer(), config).fit(lm_data(8))


@needs_fsdp2
def test_fsdp2_blocks_come_from_the_config_or_the_model(world_of_one: None) -> None:
    def fit(model: nn.Module, **fields: object) -> None:
        config = TrainConfig(distributed="fsdp2", max_steps=1, progress=False, **fields)  # type: ignore[arg-type]
        Trainer(model, config).fit(lm_data(8))

    with pytest.raises(ValueError, match=r"found no block classes .*shard_modules=\('MyBlock',\)"):
        fit(lora_transformer())
    with pytest.raises(
        ValueError, match=r"\['Blok'\] matched no module.*closest class names: \['Block'"
    ):
        fit(lora_transformer(), shard_modules=("Blok",))
    model = lora_transformer()
    fit(model, shard_modules=("Block",))
    from torch.distributed.fsdp import FSDPModule

    assert all(isinstance(b, FSDPModule) for b in model.layers)  # type: ignore[union-attr]
    assert isinstance(model, FSDPModule)


@needs_fsdp2
def test_fsdp2_bf16_computes_with_bf16_parameters_and_keeps_fp32_ones(world_of_one: None) -> None:
    model = lora_transformer()
    seen: list[torch.dtype] = []
    q_proj = model.layers[0].q_proj  # type: ignore[index, union-attr]
    q_proj.base.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    config = TrainConfig(
        distributed="fsdp2", shard_modules=("Block",), precision="bf16", max_steps=1, progress=False
    )
    Trainer(model, config).fit(lm_data(8))
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in peftkit.trainable_parameters(model)} == {torch.float32}
