"""Exact resume: a run killed and resumed ends bit-identical (on CPU) to one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import peftkit
from peftkit import CheckpointError, TrainConfig, Trainer
from peftkit.methods.lora import Lora
from peftkit.training import state as S
from peftkit.training.tasks import TaskLoss

from helpers import perturb
from trainer_data import adapter_tensors, classification_data, lm_data, lora_bert, lora_transformer
from zoo import CASES, TinyMLP


class Killed(Exception):
    pass


def _killing(after_calls: int) -> Any:
    """The default loss, raising (like a killed process: no clean-up) on call ``after_calls + 1``."""
    calls = {"n": 0}
    default = TaskLoss()

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Killed
        return default(model, batch)

    return loss_fn


def _config(out: Path, **kw: Any) -> TrainConfig:
    # 24 examples, batches of 4, 2 micro-batches per step: 3 steps per epoch, 9 in all.
    return TrainConfig(
        **{
            "epochs": 3,
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 5e-3,
            "schedule": "cosine",
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "save_every": 1,
            "save_total_limit": None,
            "eval_every": "epoch",
            "metric_for_best": "accuracy",
            "output_dir": str(out),
            "progress": False,
            **kw,
        }
    )


def _fit(
    model: nn.Module, out: Path, loss_fn: Any = None, resume: Any = None, **kw: Any
) -> Trainer:
    trainer = Trainer(
        model,
        _config(out, **kw),
        loss_fn=loss_fn,
        compute_metrics=peftkit.metrics.classification_metrics,
    )
    trainer.fit(classification_data(24), classification_data(8, seed=5), resume_from=resume)
    return trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    out = tmp_path_factory.mktemp("reference")
    model = lora_bert()
    _fit(model, out)
    return adapter_tensors(model), out


@pytest.mark.parametrize(
    ("kill_after", "resume_at"),
    [(11, "latest"), (13, "checkpoint-2")],  # 2 calls a step, 2 an eval: killed in step 5 / 6
)
def test_killed_and_resumed_run_is_bit_identical(
    tmp_path: Path, reference: tuple[dict[str, torch.Tensor], Path], kill_after: int, resume_at: str
) -> None:
    with pytest.raises(Killed):
        _fit(lora_bert(), tmp_path, loss_fn=_killing(kill_after))
    resume = "latest" if resume_at == "latest" else tmp_path / resume_at
    state = S.read_state(tmp_path / ("checkpoint-4" if resume_at == "latest" else resume_at))
    assert 0 < state["progress"]["batch"] < 6  # really mid-epoch
    model = lora_bert()  # the same base model, as a restarted script would load it
    perturb(model, seed=123)  # but other adapter values: they must come from the checkpoint
    trainer = _fit(model, tmp_path, resume=resume)
    expected, ref_dir = reference
    final = adapter_tensors(model)
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert trainer.progress.step == 9
    ours = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in (ref_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r.get("loss") for r in ours] == [r.get("loss") for r in theirs]
    assert [r.get("eval_accuracy") for r in ours] == [r.get("eval_accuracy") for r in theirs]


def test_checkpoints_hold_no_pickle_and_resume_checks_settings(
    reference: tuple[dict[str, torch.Tensor], Path],
) -> None:
    _, out = reference
    files = {p.name for p in (out / "checkpoint-9").iterdir()}
    assert files == {
        "peftkit_config.json",
        "peftkit_model.safetensors",
        S.STATE_JSON,
        S.STATE_TENSORS,
    }
    assert {p.name for p in (out / "best").iterdir()} == {
        "peftkit_config.json",
        "peftkit_model.safetensors",
        "best.json",
    }
    with pytest.raises(CheckpointError, match=r"grad_accum 2 -> 1.*resume with the same"):
        _fit(lora_bert(), out, resume=out / "checkpoint-3", grad_accum=1)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        _fit(lora_bert(), out, resume=out / "best")


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed early
    model = lora_bert()
    trainer = _fit(model, tmp_path, resume="latest", epochs=1)
    assert trainer.progress.step == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # three steps and the epoch's evaluation, nothing stale
    with pytest.raises(ValueError, match=r"already holds checkpoints .*resume_from='latest'"):
        _fit(lora_bert(), tmp_path, epochs=1)


def test_model_without_adapters_resumes_exactly(tmp_path: Path) -> None:
    def run(out: Path, kill: int | None, resume: Any = None) -> nn.Module:
        torch.manual_seed(0)
        model = TinyMLP()
        data = [(torch.randint(20, (3,)), torch.randint(5, (3,))) for _ in range(20)]
        calls = {"n": 0}

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            calls["n"] += 1
            if kill is not None and calls["n"] > kill:
                raise Killed
            return peftkit.losses.cross_entropy(m(batch[0]), batch[1])

        config = TrainConfig(
            batch_size=3,
            epochs=2,
            optimizer="sgd",
            momentum=0.9,
            lr=0.1,
            save_every=1,
            output_dir=str(out),
            progress=False,
            eval_every=None,
        )
        Trainer(model, config, loss_fn=loss_fn).fit(data, resume_from=resume)
        return model

    reference = run(tmp_path / "a", None)
    with pytest.raises(Killed):
        run(tmp_path / "b", 9)
    resumed = run(tmp_path / "b", None, resume="latest")
    for (name, p), q in zip(reference.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_optimizer_state_round_trips_through_json_and_safetensors(
    tmp_path: Path, name: str
) -> None:
    model = TinyMLP()
    trainer = Trainer(
        model,
        TrainConfig(
            optimizer=name,
            momentum=0.9,
            max_steps=2,
            progress=False,
            eval_every=None,
            save_every=None,
        ),
    )
    data = [(torch.randint(20, (3,)), torch.randint(5, (3,))) for _ in range(4)]
    trainer.loss_fn = lambda m, b: peftkit.losses.cross_entropy(m(b[0]), b[1])
    trainer.fit(data)
    original = {
        "optimizer": trainer.optimizer.state_dict(),
        "rng": S.rng_state(),
        "key": {(1, 2): 3},
    }
    S.write_state(tmp_path, original)
    loaded = S.read_state(tmp_path)
    _assert_same(original, loaded)


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_methods_with_runtime_state_are_reapplied_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method whose checkpoint carries runtime state is re-applied through load_adapter (so its own
    loader restores that state); the resumed run is still exact."""
    restored: list[dict[str, Any]] = []
    monkeypatch.setattr(Lora, "extra_state", lambda self: {"live": 1})
    monkeypatch.setattr(Lora, "load_extra_state", lambda self, state: restored.append(state))

    def run(out: Path, kill: int | None, resume: Any = None) -> nn.Module:
        model = lora_transformer()
        calls = {"n": 0}
        default = TaskLoss("causal_lm")

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            calls["n"] += 1
            if kill is not None and calls["n"] > kill:
                raise Killed
            return default(m, batch)

        config = TrainConfig(
            batch_size=4,
            epochs=2,
            lr=1e-2,
            save_every=1,
            output_dir=str(out),
            progress=False,
            eval_every=None,
        )
        Trainer(model, config, loss_fn=loss_fn).fit(lm_data(16), resume_from=resume)
        return model

    reference = adapter_tensors(run(tmp_path / "a", None))
    with pytest.raises(Killed):
        run(tmp_path / "b", 5)
    model = run(tmp_path / "b", None, resume="latest")
    # Restored twice: on the meta-device skeleton that checks the sizes against the file (saved
    # state such as AdaLoRA's ranks decides them), then on the model.
    assert restored == [{"live": 1}] * 2
    for key, value in adapter_tensors(model).items():
        assert torch.equal(value, reference[key]), key


def test_a_run_whose_adapter_saves_in_another_form_refuses_to_resume_naming_why(
    tmp_path: Path,
) -> None:
    """Prefix-tuning through an MLP saves the folded prefix: its optimiser state cannot be restored
    onto it, and the resume says so instead of failing inside torch."""

    def run(resume: Any = None) -> None:
        model = CASES["llama"].build()
        peftkit.apply_prefix(model, prefix_length=2, mlp_hidden=8)
        config = TrainConfig(
            batch_size=4, max_steps=2, lr=1e-2, save_every=1, eval_every=None,
            output_dir=str(tmp_path), progress=False,
        )  # fmt: skip
        Trainer(model, config, loss_fn=TaskLoss("causal_lm")).fit(lm_data(8), resume_from=resume)

    run()
    with pytest.raises(CheckpointError, match=r"cannot resume: .*prefix-tuning with mlp_hidden"):
        run(resume="latest")
