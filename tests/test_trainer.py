"""The Trainer's step, optimisers, schedules, precision, hooks, evaluation and outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import NonFiniteLossError, TrainConfig, Trainer
from peftkit.training.optim import Schedule, decays, param_groups

from trainer_data import adapter_tensors, classification_data, lm_data, lora_bert, lora_transformer
from zoo import TinyTransformer

QUIET = {"progress": False, "eval_every": None, "save_every": None}


def lm_config(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "lr": 1e-2, "task": "causal_lm", **QUIET, **kw})


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"warmup_steps": 3, "warmup_ratio": 0.1}, "not both"),
        ({"grad_accum": 0}, "grad_accum must be a positive integer"),
        ({"eval_every": "weekly"}, "eval_every"),
        ({"load_best_at_end": True}, "needs output_dir"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
    ],
)
def test_config_errors_name_the_fix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_fp16_needs_cuda_and_a_model_needs_trainable_parameters() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use 'bf16' on CPU"):
            Trainer(TinyTransformer(), TrainConfig(precision="fp16"))
    frozen = TinyTransformer().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, lm_config(max_steps=1)).fit(lm_data(4))


# -- optimiser and schedule -------------------------------------------------------------------------
def test_weight_decay_groups_are_structural() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(3, 3))  # a matrix called "bias": decays
            self.norm = nn.LayerNorm((3, 3))  # a 2-D norm weight: never decays
            self.lin = nn.Linear(3, 3)

    model = Odd()
    groups = param_groups(model, list(model.parameters()), weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.bias), id(model.lin.weight)}
    assert not decays(model.norm.weight, model.norm)


def test_trainer_optimises_only_adapter_parameters_with_adamw_groups() -> None:
    model = lora_bert()
    trainer = Trainer(model, TrainConfig(max_steps=1, weight_decay=0.05, **QUIET))
    trainer.fit(classification_data(8))
    in_opt = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == {id(p) for p in peftkit.trainable_parameters(model)}
    no_decay = [
        p for g in trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    ]
    assert no_decay and all(p.ndim == 1 for p in no_decay)  # the head's bias, LayerNorm-free head


def test_schedules_by_hand() -> None:
    linear = Schedule("linear", total=10, warmup=2)
    assert [linear(s) for s in (0, 1, 2, 6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5])
    cosine = Schedule("cosine", total=12, warmup=2, min_ratio=0.1)
    assert cosine(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cosine(2) == pytest.approx(1.0) and Schedule("constant", 5, 1)(4) == 1.0


def test_logged_lr_follows_the_schedule() -> None:
    trainer = Trainer(lora_transformer(), lm_config(max_steps=5, schedule="linear", warmup_steps=1))
    trainer.fit(lm_data(20))
    expected = [1e-2 * Schedule("linear", 5, 1)(s) for s in range(5)]
    assert [r["lr"] for r in trainer.history] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_learns(name: str) -> None:
    lr = {"adamw": 3e-2, "sgd": 0.5, "adafactor": 3e-2}[name]
    # torch's Adafactor scales each step by the parameter's RMS, so LoRA's zero-initialised B
    # barely moves at first: it is shown here fine-tuning a whole (small) model instead.
    model = TinyTransformer() if name == "adafactor" else lora_transformer()
    trainer = Trainer(model, lm_config(max_steps=25, optimizer=name, lr=lr, momentum=0.9))
    trainer.fit(lm_data(40))
    assert type(trainer.optimizer).__name__.lower() == name
    losses = [r["loss"] for r in trainer.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_gradient_accumulation_matches_the_large_batch() -> None:
    results = []
    for batch, accum in [(8, 1), (4, 2)]:
        model = lora_transformer()
        config = lm_config(max_steps=3, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5)
        Trainer(model, config).fit(lm_data(24))
        results.append(adapter_tensors(model))
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


def test_clipping_bounds_the_update() -> None:
    model = lora_transformer()
    before = torch.cat([p.detach().flatten().clone() for p in peftkit.trainable_parameters(model)])
    config = lm_config(max_steps=1, optimizer="sgd", lr=1.0, max_grad_norm=1e-3)
    trainer = Trainer(model, config)
    trainer.fit(lm_data(8))
    after = torch.cat([p.detach().flatten() for p in peftkit.trainable_parameters(model)])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert trainer.history[0]["grad_norm"] > 1e-3  # the norm before clipping is logged


def test_bf16_autocast_on_cpu() -> None:
    model = lora_transformer()
    dtypes: list[torch.dtype] = []
    model.layers[0].up.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    trainer = Trainer(model, lm_config(max_steps=2, precision="bf16"))
    trainer.fit(lm_data(8))
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    assert all(p.dtype == torch.float32 for p in peftkit.trainable_parameters(model))


# -- hooks and regularisers ---------------------------------------------------------------------
def test_method_hooks_regularizer_per_micro_batch_and_step_hooks_before_zero_grad() -> None:
    model = lora_transformer()
    method = peftkit.adapters(model)["default"]
    seen: dict[str, list[Any]] = {"reg": [], "steps": [], "grads": []}

    def reg(m: nn.Module) -> torch.Tensor:
        seen["reg"].append(1)
        return sum(p.sum() for p in method.parameters()) * 0.0 + 10.0

    def on_step_end(m: nn.Module, step: int) -> None:
        seen["steps"].append(step)
        seen["grads"].append(all(p.grad is not None for p in method.parameters()))

    method.regularizer = reg  # type: ignore[method-assign]
    method.on_step_end = on_step_end  # type: ignore[method-assign]
    Trainer(model, lm_config(max_steps=3, grad_accum=2)).fit(lm_data(24))
    assert len(seen["reg"]) == 6 and seen["steps"] == [0, 1, 2] and all(seen["grads"])


def test_extra_regularizers_are_added_to_the_loss() -> None:
    moved = []
    for alpha in (0.0, 1e4):
        model = lora_transformer()
        start = adapter_tensors(model)
        penalty = peftkit.losses.L2SP(model, alpha=alpha)
        Trainer(
            model, lm_config(max_steps=5, optimizer="sgd", lr=1e-3), regularizers=[penalty]
        ).fit(lm_data(20))
        end = adapter_tensors(model)
        moved.append(sum((end[k] - start[k]).norm().item() for k in end))
    assert moved[1] < 0.2 * moved[0]


# -- non-finite losses ----------------------------------------------------------------------------
def _nan_at(call: int) -> Any:
    calls = {"n": 0}
    default = peftkit.trainer.TaskLoss("causal_lm")

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = default(model, batch)
        return loss * float("nan") if calls["n"] == call else loss

    return loss_fn


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    model = lora_transformer()
    config = lm_config(max_steps=5, output_dir=str(tmp_path), save_every=1, save_total_limit=None)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan .*checkpoint-2.*on_nonfinite"):
        Trainer(model, config, loss_fn=_nan_at(3)).fit(lm_data(20))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(model).values())


def test_nonfinite_loss_can_skip_the_step() -> None:
    model = lora_transformer()
    after: list[dict[str, torch.Tensor]] = []
    trainer = Trainer(model, lm_config(max_steps=4, on_nonfinite="skip"), loss_fn=_nan_at(3))
    original = trainer.train_step

    def recording_step(batches: Any) -> dict[str, Any]:
        out = original(batches)
        after.append(adapter_tensors(model))
        return out

    trainer.train_step = recording_step  # type: ignore[method-assign]
    trainer.fit(lm_data(20))
    assert trainer.progress.skipped == 1 and trainer.progress.step == 4
    assert all(torch.equal(after[1][k], after[2][k]) for k in after[1])  # step 3 changed nothing
    assert not all(torch.equal(after[2][k], after[3][k]) for k in after[2])


# -- data ------------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """A one-weight regression model that records the examples it sees (their first feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 1)
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(x[:, 0].tolist())
        out: torch.Tensor = self.w(x)
        return out


def test_a_dataloader_with_its_own_sampler_keeps_it_in_training_and_evaluation() -> None:
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10, 1))
    subset = DataLoader(data, batch_size=2, sampler=SubsetRandomSampler([0, 1, 2, 3]))
    model = _Recorder()
    trainer = Trainer(model, TrainConfig(epochs=2, task="regression", **QUIET))
    assert trainer.fit(subset).step == 4  # 2 epochs of 2 batches
    assert sorted(model.seen) == sorted([0.0, 1.0, 2.0, 3.0] * 2)
    model.seen.clear()
    trainer.evaluate(subset)
    assert sorted(model.seen) == [0.0, 1.0, 2.0, 3.0]


def test_a_sampler_with_set_epoch_gets_each_epoch() -> None:
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    class EpochSampler(Sampler[int]):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self) -> Any:
            return iter(range(4))

        def __len__(self) -> int:
            return 4

    sampler = EpochSampler()
    data = TensorDataset(torch.arange(4.0).unsqueeze(1), torch.zeros(4, 1))
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    Trainer(_Recorder(), TrainConfig(epochs=3, task="regression", **QUIET)).fit(loader)
    assert sampler.epochs == [0, 1, 2]


# -- evaluation, early stopping, best checkpoint, logs --------------------------------------------
def test_early_stopping_keeps_the_best_adapter(tmp_path: Path) -> None:
    model = lora_transformer()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    snapshots: list[dict[str, torch.Tensor]] = []

    def compute_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        snapshots.append(adapter_tensors(model))
        return {"score": next(scores), "accuracy": peftkit.metrics.accuracy(preds, labels)}

    config = lm_config(
        max_steps=20,
        eval_every=2,
        metric_for_best="score",
        patience=2,
        output_dir=str(tmp_path),
        load_best_at_end=True,
    )
    result = Trainer(model, config, compute_metrics=compute_metrics).fit(
        lm_data(40), lm_data(8, seed=1)
    )
    assert result.stopped_early and result.step == 8 and result.best_step == 4
    assert (
        result.best_metric == 0.7
        and json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 4
    )
    best = lora_transformer(seed=1)
    peftkit.training.state.load_weights(best, tmp_path / "best")
    for key, value in snapshots[1].items():
        assert torch.equal(adapter_tensors(best)[key], value)
        assert torch.equal(adapter_tensors(model)[key], value)  # load_best_at_end


def test_evaluate_reports_loss_and_metrics() -> None:
    model = lora_bert()
    trainer = Trainer(
        model,
        TrainConfig(eval_batch_size=5, **QUIET),
        compute_metrics=peftkit.metrics.classification_metrics,
    )
    data = classification_data(12)
    metrics = trainer.evaluate(data)
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
        out = model(**batch)
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(
        peftkit.metrics.accuracy(out.logits.argmax(-1), batch["labels"])
    )


def test_jsonl_log_holds_every_metric(tmp_path: Path) -> None:
    config = lm_config(max_steps=4, eval_every=2, output_dir=str(tmp_path), save_every=2)
    Trainer(lora_transformer(), config).fit(lm_data(20), lm_data(4, seed=2))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "epoch"} <= set(train[0])
    assert train[0]["tokens_per_s"] > 0


def test_progress_bar_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Trainer(lora_transformer(), lm_config(max_steps=2, progress=True)).fit(lm_data(8))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    Trainer(lora_transformer(), lm_config(max_steps=2, progress=True)).fit(lm_data(8))
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "tok/s=" in err


def test_import_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, peftkit; peftkit.Trainer, peftkit.metrics; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
