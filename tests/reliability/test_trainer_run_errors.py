"""Reliability corpus, Trainer runs: a run that would end with a silent surprise (no evaluation, a
NaN eval loss, a method schedule cut short, nothing trained) is refused before its first step, or
goes ahead with a warning that says what happens. A refused run leaves the model as it was.

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit import TrainConfig, Trainer

from helpers import snapshot
from trainer_cases import (
    LM,
    adapter_copy,
    classifier,
    lm_config,
    lm_fit,
    lm_model,
    pairs,
)
from trainer_data import lm_data
from zoo import TinyTransformer


def _refused(model: torch.nn.Module, config: TrainConfig, match: str, **fit: Any) -> None:
    """``fit`` raises ValueError matching ``match`` and leaves every tensor of ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        Trainer(model, config, loss_fn=LM).fit(fit.pop("train", lm_data(16)), **fit)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- evaluation ---------------------------------------------------------------------------------
def test_empty_eval_set_is_refused_before_training() -> None:
    _refused(
        lm_model(), lm_config(eval_every=1), r"eval_data is empty: pass examples", eval_data=[]
    )


def test_eval_iterable_that_yields_nothing_is_an_error_not_a_nan_loss() -> None:
    trainer = Trainer(lm_model(), lm_config(eval_every=1), loss_fn=LM)
    with pytest.raises(ValueError, match=r"eval_data yielded no examples, so there is no loss"):
        trainer.fit(lm_data(16), iter([]))
    assert not any("eval_loss" in r for r in trainer.history), "an eval_loss was logged"


def test_evaluation_that_never_comes_with_load_best_at_end_is_refused(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=3, eval_every=100, load_best_at_end=True)
    match = (
        r"load_best_at_end: eval_every=100 never comes in this run of 3 optimiser steps, so no "
        r"best adapter would exist; set eval_every"
    )
    _refused(lm_model(), config, match, eval_data=lm_data(4))
    assert not (tmp_path / "checkpoint-1").exists()


def test_load_best_at_end_without_eval_data_is_refused(tmp_path: Path) -> None:
    config = lm_config(tmp_path, eval_every=1, load_best_at_end=True)
    _refused(lm_model(), config, r"load_best_at_end needs eval_data")


def test_patience_with_an_evaluation_that_never_comes_is_refused() -> None:
    config = lm_config(max_steps=3, eval_every=5, patience=2)
    _refused(lm_model(), config, r"patience: eval_every=5 never comes", eval_data=lm_data(4))


def test_eval_data_that_will_never_be_evaluated_warns_and_trains() -> None:
    model = lm_model()
    before = adapter_copy(model)
    with pytest.warns(UserWarning, match=r"eval_data will not be evaluated: eval_every='epoch' "
                      r"never comes in this run of 2 optimiser steps"):  # fmt: skip
        lm_fit(model, lm_config(max_steps=2, eval_every="epoch"), eval_data=lm_data(4))
    assert any(not torch.equal(v, before[k]) for k, v in adapter_copy(model).items())


# -- method schedules ---------------------------------------------------------------------------
def _adalora(total_steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply_adalora(
        model, total_steps=total_steps, init_r=4, target_r=2, delta_t=1, targets=["q_proj"]
    )
    return model


def test_adalora_schedule_longer_than_the_run_is_refused() -> None:
    _refused(
        _adalora(1000),
        lm_config(max_steps=6),
        r"adapter 'default' \(adalora\) plans its step schedule for 1000 optimiser steps, but "
        r"this run takes 6: the schedule would be cut short .*total_steps=6\) or train for 1000",
    )


def test_adalora_schedule_shorter_than_the_run_warns_and_prunes() -> None:
    model = _adalora(4)
    with pytest.warns(UserWarning, match=r"the schedule ends at step 4 and the last 2 steps train"):
        lm_fit(model, lm_config(max_steps=6))
    method = peftkit.adapters(model)["default"]
    assert sum(method.rank_pattern().values()) == method.final_budget  # pruned to target_r


def test_a_method_schedule_is_read_through_its_hook_not_its_type() -> None:
    """Any method that reports planned_steps gets the same check (here LoRA, patched)."""
    model = lm_model()
    method = peftkit.adapters(model)["default"]
    method.planned_steps = lambda: 50  # type: ignore[method-assign]
    _refused(model, lm_config(max_steps=4), r"'default' \(lora\) plans its step schedule for 50")


# -- length and warm-up -------------------------------------------------------------------------
def test_warmup_as_long_as_the_run_is_refused() -> None:
    _refused(lm_model(), lm_config(max_steps=4, warmup_steps=4),
             r"warmup_steps=4 is not shorter than the run \(4 optimiser steps\): lr would never "
             r"reach 0.01")  # fmt: skip


def test_grad_accum_beyond_an_epoch_warns_with_the_effective_number() -> None:
    model = lm_model()
    with pytest.warns(UserWarning, match=r"grad_accum=8 exceeds the 4 micro-batches of an epoch"):
        lm_fit(model, lm_config(max_steps=None, epochs=1, grad_accum=8))


def test_one_shot_iterable_that_runs_out_warns_with_the_steps_taken() -> None:
    trainer = Trainer(lm_model(), lm_config(max_steps=10), loss_fn=LM)
    batches = (torch.stack(lm_data(8)[i : i + 4]) for i in (0, 4))
    with pytest.warns(
        UserWarning, match=r"the training data ran out after 2 of 10 optimiser steps"
    ):
        result = trainer.fit(batches)
    assert result.step == 2


def test_iterable_that_yields_no_batch_is_refused() -> None:
    _refused(lm_model(), lm_config(max_steps=3), r"the training data yielded no batches",
             train=iter([]))  # fmt: skip


# -- the output directory -----------------------------------------------------------------------
def test_output_dir_that_is_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "run"
    os.symlink(tmp_path / "gone", link)
    _refused(lm_model(), lm_config(link), r"output_dir .*run is a symbolic link to .*gone, which "
             r"does not exist; create the target directory or pass another output_dir")  # fmt: skip
    assert not (tmp_path / "gone").exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("notes")
    _refused(
        lm_model(), lm_config(tmp_path / "run"), r"output_dir .*run is a file; pass a directory"
    )
    assert (tmp_path / "run").read_text() == "notes"


def test_output_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("x")
    _refused(
        lm_model(), lm_config(tmp_path / "notes" / "run"), r"lies under .*notes, which is a file"
    )


# -- what trains --------------------------------------------------------------------------------
def test_every_adapter_inactive_is_refused_naming_set_active() -> None:
    model = lm_model()
    peftkit.set_active(model, [])
    _refused(model, lm_config(), r"every adapter is inactive \('default'\), so nothing would "
             r"train; activate one first, e.g. peftkit.set_active\(model, 'default'\)")  # fmt: skip


def test_training_a_merged_adapter_is_refused_naming_unmerge() -> None:
    model = lm_model()
    peftkit.merge(model)
    _refused(model, lm_config(), r"adapter 'default' is merged into the base weights, so training "
             r"would not change the model; unmerge first \(peftkit.unmerge\(model\)\) or apply a "
             r"new adapter")  # fmt: skip


# -- labels -------------------------------------------------------------------------------------
LABELS: list[tuple[str, int, str, torch.Tensor, str]] = [
    ("classification-float-labels", 3, "classification", torch.tensor([0.0, 1.0, 2.0, 1.0]),
     r"labels of shape \(4,\) and dtype torch.float32 do not fit logits of shape \(4, 3\) for "
     r"task 'classification', which expects integer class indices .*labels.long\(\)"),
    ("classification-column-labels", 3, "auto", torch.tensor([[0], [1], [2], [1]]),
     r"labels of shape \(4, 1\) and dtype torch.int64 do not fit logits of shape \(4, 3\)"),
    ("classification-bool-labels", 3, "classification", torch.tensor([True, False, True, True]),
     r"dtype torch.bool do not fit .*integer class indices"),
    ("regression-integer-targets", 1, "regression", torch.tensor([1, 2, 3, 4]),
     r"task 'regression', which expects float targets .*labels.float\(\)"),
    ("regression-wrong-width", 3, "regression", torch.tensor([0.5, 1.0, 2.0, 1.0]),
     r"labels of shape \(4,\) .* logits of shape \(4, 3\) for task 'regression'"),
    ("multi-label-wrong-width", 3, "multi_label", torch.tensor([[1.0, 0.0]] * 4),
     r"labels of shape \(4, 2\) .* logits of shape \(4, 3\) for task 'multi_label', which "
     r"expects 0/1 float targets shaped like the logits"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("classes", "task", "labels", "match"), [c[1:] for c in LABELS], ids=[c[0] for c in LABELS]
)
def test_labels_of_the_wrong_shape_or_dtype_name_both_and_the_task(
    classes: int, task: str, labels: torch.Tensor, match: str
) -> None:
    model = classifier(classes)
    before = snapshot(model)
    config = TrainConfig(max_steps=1, batch_size=4, task=task, eval_every=None, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        Trainer(model, config).fit(pairs(labels))
    assert all(torch.equal(snapshot(model)[k], v) for k, v in before.items())


def test_matching_labels_train(tmp_path: Path) -> None:
    """The control: the same classifier with integer labels of shape (N,) trains."""
    model = classifier(3)
    before = adapter_copy(model)
    config = TrainConfig(max_steps=2, batch_size=4, eval_every=None, progress=False, lr=1e-2)
    Trainer(model, config).fit(pairs(torch.tensor([0, 1, 2, 1, 0, 2, 1, 0])))
    assert any(not torch.equal(v, before[k]) for k, v in adapter_copy(model).items())


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path) -> Iterator[None]:
    yield
    assert not list(tmp_path.glob("**/.checkpoint-*.tmp")), "a temporary directory was left"
