"""Reliability corpus, Trainer resume and run directories: a resume never changes the user's set-up
or ignores their config silently, and a run directory edited by hand, damaged or copied from
another run ends in a ``CheckpointError`` naming the file and the fix.

What resume honours and refuses is stated in docs/trainer.md ("What a resume honours"). Cases are
listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import Trainer
from peftkit.training import state as S

from helpers import snapshot
from trainer_cases import LM, adapter_copy, lm_config, lm_fit, lm_model
from trainer_data import lm_data
from zoo import TinyTransformer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (a checkpoint every step) to copy and tamper with."""
    out = tmp_path_factory.mktemp("run") / "out"
    lm_fit(lm_model(), lm_config(out))
    return out


def _copy(run: Path, tmp_path: Path, keep: int = 2) -> Path:
    """The run with checkpoints 1..``keep`` only: resuming it has steps left to take."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    for step in range(keep + 1, 5):
        shutil.rmtree(out / f"checkpoint-{step}")
    return out


def _resume(model: torch.nn.Module, out: Path, resume: Any = "latest", **kw: Any) -> Trainer:
    return lm_fit(model, lm_config(out, **kw), resume=resume)


def _refused(model: torch.nn.Module, out: Path, match: str, **kw: Any) -> None:
    """Resuming raises ``CheckpointError`` (or ValueError) matching ``match``; model untouched."""
    before = snapshot(model)
    types = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        _resume(model, out, **kw)
    assert [type(m).__name__ for m in model.modules()] == types
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- the model's set-up ---------------------------------------------------------------------------
SETUPS: list[tuple[str, Any, str]] = [
    ("rank-changed", lambda: lm_model(r=4),
     r"the run trained lora adapter 'default', the model carries lora adapter 'default' "
     r"\(adapter 'default': r 2 in the run, 4 in the model\)"),
    ("targets-changed", lambda: lm_model(targets=["q_proj"]),
     r"targets \['q_proj', 'v_proj'\] in the run, \['q_proj'\] in the model"),
    ("method-changed", lambda: _adapter_model(),
     r"the run trained lora adapter 'default', the model carries adapter adapter 'default'"),
    ("adapter-renamed", lambda: lm_model(adapter_name="task"),
     r"the run trained lora adapter 'default', the model carries lora adapter 'task'"),
    ("no-adapter-applied", lambda: _bare_model(),
     r"the run trained lora adapter 'default', the model carries no adapter"),
]  # fmt: skip


def _adapter_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply_adapter(model, targets=["layers.0", "layers.1"])
    return model


def _bare_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    for p in model.lm_head.parameters():
        p.requires_grad_(True)
    for p in model.layers.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize(("build", "match"), [c[1:] for c in SETUPS], ids=[c[0] for c in SETUPS])
def test_resume_into_a_model_set_up_differently_is_refused_naming_both(
    run: Path, tmp_path: Path, build: Any, match: str
) -> None:
    out = _copy(run, tmp_path)
    _refused(build(), out, match + r".*Resuming would replace the model's set-up with the "
             r"checkpoint's; start a new run in another output_dir, or set the model up as the "
             r"run did")  # fmt: skip


# -- the config -----------------------------------------------------------------------------------
def test_changed_lr_is_honoured_with_a_warning(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path)
    with pytest.warns(UserWarning, match=r"with changed settings, honoured from this step on: "
                      r"lr 0.01 -> 0.05"):  # fmt: skip
        trainer = _resume(lm_model(), out, lr=0.05)
    resumed = [r["lr"] for r in trainer.history if "lr" in r]
    assert resumed == [0.05, 0.05]  # steps 3 and 4 at the new lr (constant schedule)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.05


def test_changed_weight_decay_and_betas_reach_the_optimiser(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path)
    with pytest.warns(UserWarning, match=r"weight_decay 0.0 -> 0.1, .*betas \[0.9, 0.999\] -> "
                      r"\[0.8, 0.99\]"):  # fmt: skip
        trainer = _resume(lm_model(), out, weight_decay=0.1, betas=(0.8, 0.99))
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1]  # LoRA's factors are matrices
    assert all(g["betas"] == (0.8, 0.99) for g in groups)


def test_unchanged_config_resumes_without_a_warning_and_exactly(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _resume(lm_model(), out).raw
    expected = load_file(str(run / "checkpoint-4" / "peftkit_model.safetensors"))
    got = adapter_copy(model)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_longer_run_is_honoured_with_a_warning(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path, keep=4)
    with pytest.warns(UserWarning, match=r"max_steps 4 -> 6"):
        result = _resume(lm_model(), out, max_steps=6)
    assert result.progress.step == 6 and (out / "checkpoint-6").is_dir()


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("optimizer-changed", {"optimizer": "sgd"}, r"changed optimizer 'adamw' -> 'sgd'"),
    ("seed-changed", {"seed": 1}, r"changed seed 0 -> 1"),
    (
        "metric-changed",
        {"metric_for_best": "accuracy"},
        r"changed metric_for_best 'loss' -> 'accuracy'",
    ),
]


@pytest.mark.parametrize(("fields", "match"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_config_change_the_saved_state_cannot_follow_is_refused(
    run: Path, tmp_path: Path, fields: dict[str, Any], match: str
) -> None:
    out = _copy(run, tmp_path)
    _refused(lm_model(), out, r"cannot resume from .*checkpoint-2 with a " + match +
             r".*Resume with the run's value, or start a new run", **fields)  # fmt: skip


def test_batch_size_changed_is_refused(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path)
    _refused(lm_model(), out, r"written by a run with other settings \(batch_size 4 -> 2\)",
             batch_size=2)  # fmt: skip


def test_run_shortened_below_the_checkpoint_is_refused(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path, keep=4)
    _refused(lm_model(), out, r"checkpoint-4 is at step 4, past this run's 2 optimiser steps; "
             r"raise max_steps", max_steps=2)  # fmt: skip


# -- the run directory ----------------------------------------------------------------------------
def _edit_optimiser(path: Path) -> None:
    file = path / S.STATE_TENSORS
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if "exp_avg" in k)
    tensors[key] = torch.full_like(tensors[key], 1e30)
    save_file(tensors, str(file))  # a valid file without the checksum's metadata


def _edit_step(path: Path) -> None:
    file = path / S.STATE_JSON
    doc = json.loads(file.read_text())
    doc["progress"]["step"] = 1
    file.write_text(json.dumps(doc, indent=1) + "\n")


def _edit_rewritten(path: Path) -> None:
    """Re-save the tensors with a new value and the old file's metadata (the checksum)."""
    from safetensors import safe_open

    file = path / S.STATE_TENSORS
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if "exp_avg_sq" in k)
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(file), metadata=meta)


DAMAGE: list[tuple[str, Any, str]] = [
    ("optimiser-value-edited", _edit_rewritten,
     r"trainer_state.json and trainer_state.safetensors do not match the checksum written when "
     r"they were saved \(edited or corrupt\); resume from an earlier checkpoint-N"),
    ("optimiser-file-replaced", _edit_optimiser,
     r"trainer_state.safetensors has no checksum, though trainer_state.json says the Trainer "
     r"wrote one"),
    ("state-json-edited", _edit_step, r"do not match the checksum"),
    ("pickle-instead-of-safetensors",
     lambda p: (p / S.STATE_TENSORS).write_bytes(pickle.dumps({"state": [1, 2]})),
     r"trainer_state.safetensors is a pickle \(torch.save\) file, not safetensors; peftkit "
     r"never unpickles"),
    ("truncated-state-json",
     lambda p: (p / S.STATE_JSON).write_text((p / S.STATE_JSON).read_text()[:200]),
     r"trainer_state.json is truncated or not valid JSON \(.*\); resume from an earlier"),
    ("deeply-nested-state-json",
     lambda p: (p / S.STATE_JSON).write_text("[" * 200_000 + "]" * 200_000),
     r"trainer_state.json is truncated or not valid JSON \(nested too deeply\)"),
    ("truncated-state-tensors",
     lambda p: (p / S.STATE_TENSORS).write_bytes((p / S.STATE_TENSORS).read_bytes()[:100]),
     r"trainer_state.safetensors is truncated or corrupt"),
    ("state-tensors-deleted", lambda p: (p / S.STATE_TENSORS).unlink(),
     r"is not a training checkpoint \(no trainer_state.safetensors\); pass a checkpoint-N"),
    ("state-without-scaler",
     lambda p: S.write_state(p, {k: v for k, v in S.read_state(p).items() if k != "scaler"}),
     r"trainer_state.json is not a Trainer's state \(no \['scaler'\]\)"),
    ("checkpoint-renamed",
     lambda p: (p / S.STATE_JSON).exists() and p.rename(p.with_name("checkpoint-3")),
     r"checkpoint-3 holds the training state of step 2, not 3 \(renamed or copied from another "
     r"run\?\); rename it checkpoint-2"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "match"), [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_or_edited_training_state_is_refused_naming_the_file(
    run: Path, tmp_path: Path, damage: Any, match: str
) -> None:
    out = _copy(run, tmp_path)
    shutil.rmtree(out / "checkpoint-1")  # resume_from="latest" must pick the damaged one
    damage(out / "checkpoint-2")
    _refused(lm_model(), out, match)


@pytest.mark.parametrize("target", ["output_dir", "best"], ids=["the-run-directory", "best"])
def test_resume_from_a_directory_that_is_no_checkpoint_names_what_to_pass(
    run: Path, tmp_path: Path, target: str
) -> None:
    out = _copy(run, tmp_path)
    if target == "best":
        peftkit.save_adapter(lm_model(), out / "best")
    path = out if target == "output_dir" else out / "best"
    _refused(lm_model(), out, r"is not a training checkpoint \(no trainer_state.json or "
             r"trainer_state.safetensors\); pass a checkpoint-N directory", resume=path)  # fmt: skip


def test_edited_log_lines_are_dropped_on_resume(run: Path, tmp_path: Path) -> None:
    out = _copy(run, tmp_path)
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '[1, 2]\n{"step": "x"}\nnot json\n')
    _resume(lm_model(), out)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_checkpoint_of_another_run_setup_in_a_fresh_directory_is_refused(
    run: Path, tmp_path: Path
) -> None:
    """A checkpoint-N copied from a run of another model into a new output_dir."""
    out = tmp_path / "new"
    out.mkdir()
    shutil.copytree(run / "checkpoint-2", out / "checkpoint-2")
    _refused(lm_model(r=8), out, r"r 2 in the run, 8 in the model")
    assert not (out / "checkpoint-3").exists()


def test_trainer_run_without_resume_into_a_used_directory_is_refused(
    run: Path, tmp_path: Path
) -> None:
    out = _copy(run, tmp_path)
    model = lm_model()
    with pytest.raises(ValueError, match=r"already holds checkpoints \(checkpoint-2\); pass "
                       r"resume_from='latest' to continue that run, or use another output_dir"):  # fmt: skip
        Trainer(model, lm_config(out), loss_fn=LM).fit(lm_data(16))


def test_state_written_before_checksums_existed_still_resumes(run: Path, tmp_path: Path) -> None:
    """A format-1 training state (no checksum) from an older peftkit resumes, to the same weights."""
    out = _copy(run, tmp_path)
    path = out / "checkpoint-2"
    doc = json.loads((path / S.STATE_JSON).read_text())
    doc["format"] = 1
    (path / S.STATE_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    save_file(load_file(str(path / S.STATE_TENSORS)), str(path / S.STATE_TENSORS))  # no metadata
    model = _resume(lm_model(), out).raw
    expected = load_file(str(run / "checkpoint-4" / "peftkit_model.safetensors"))
    got = adapter_copy(model)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
