"""Reliability corpus, Trainer settings: a mistyped, wrongly typed, out-of-range or inconsistent
``TrainConfig`` field is refused when the config (or the Trainer) is built, with a message that
names the field and what it accepts. Nothing trains.

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from peftkit import TrainConfig, Trainer
from peftkit.training.checks import check_precision

from trainer_cases import lm_model

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("lr-string", {"lr": "1e-4"}, r"lr must be a positive finite number, got '1e-4'"),
    ("lr-zero", {"lr": 0}, r"lr must be a positive finite number, got 0"),
    ("epochs-zero", {"epochs": 0}, r"epochs must be a positive integer, got 0"),
    ("batch-size-fractional", {"batch_size": 2.5}, r"batch_size must be a positive integer"),
    ("grad-accum-zero", {"grad_accum": 0}, r"grad_accum must be a positive integer, got 0"),
    ("max-steps-negative", {"max_steps": -1}, r"max_steps must be a positive integer, got -1"),
    ("optimizer-typo", {"optimizer": "adam"}, r"optimizer must be one of \('adamw', 'sgd'"),
    ("schedule-typo", {"schedule": "cosin"}, r"schedule must be one of .*got 'cosin'"),
    ("precision-torch-name", {"precision": "float16"}, r"precision must be one of \('fp32'"),
    ("task-typo", {"task": "classfication"}, r"task must be one of .*'classification'"),
    ("warmup-steps-float", {"warmup_steps": 5.0}, r"warmup_steps must be an integer >= 0"),
    ("warmup-both", {"warmup_steps": 2, "warmup_ratio": 0.1}, r"warmup_ratio, not both"),
    ("warmup-ratio-whole-run", {"warmup_ratio": 1.0}, r"warmup_ratio < 1"),
    ("betas-one-value", {"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\)"),
    ("eval-every-zero", {"eval_every": 0}, r"eval_every \(steps, 'epoch' or None\) must be"),
    ("save-every-word", {"save_every": "step"}, r"save_every \(steps, 'epoch' or None\)"),
    ("patience-zero", {"patience": 0}, r"patience must be a positive integer, got 0"),
    ("save-total-limit-zero", {"save_total_limit": 0}, r"save_total_limit must be a positive"),
    ("min-delta-nan", {"min_delta": float("nan")}, r"min_delta must be a finite number"),
    ("weight-decay-negative", {"weight_decay": -0.1}, r"weight_decay must be >= 0"),
    ("max-grad-norm-zero", {"max_grad_norm": 0}, r"max_grad_norm must be a positive finite"),
    ("seed-string", {"seed": "0"}, r"seed must be an integer, got '0'"),
    ("num-workers-negative", {"num_workers": -1}, r"num_workers must be an integer >= 0"),
    ("flag-string-false", {"progress": "false"}, r"progress must be True or False, got 'false'"),
    ("flag-string-load-best", {"load_best_at_end": "no"}, r"load_best_at_end must be True or"),
    ("flag-int-compile", {"compile": 1}, r"compile must be True or False, got 1"),
    ("greater-is-better-string", {"greater_is_better": "yes"}, r"True, False or None"),
    ("output-dir-number", {"output_dir": 5}, r"output_dir must be a path \(a str\), got 5"),
    ("load-best-without-output-dir", {"load_best_at_end": True}, r"needs output_dir"),
]


@pytest.mark.parametrize(("fields", "match"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_invalid_train_config_field_is_refused(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


UNKNOWN: list[tuple[str, dict[str, Any], str]] = [
    ("hf-learning-rate", {"learning_rate": 1e-3}, r"peftkit calls it lr= \(did you mean lr=0.001"),
    ("hf-fp16-flag", {"fp16": True}, r"calls it precision= \(did you mean precision='fp16'\?\)"),
    ("hf-accumulation", {"gradient_accumulation_steps": 4}, r"did you mean grad_accum=4\?"),
    ("typo-max-step", {"max_step": 3}, r"'max_step'; did you mean max_steps="),
    ("unrelated-keyword", {"colour": "red"}, r"its fields are: epochs, max_steps, batch_size"),
]


@pytest.mark.parametrize(("fields", "match"), [c[1:] for c in UNKNOWN], ids=[c[0] for c in UNKNOWN])
def test_unknown_train_config_keyword_names_the_field(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=r"TrainConfig has no field .*" + match):
        TrainConfig(**fields)


def test_path_output_dir_is_accepted_and_stored_as_text(tmp_path: Any) -> None:
    config = TrainConfig(output_dir=tmp_path / "run")
    assert config.to_dict()["output_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu", r"device='gpu' is not a device torch knows; use 'auto', 'cpu', 'cuda'"),
        ("cuda:99", r"CUDA"),
    ],
    ids=["unknown-device", "missing-cuda-device"],
)
def test_unusable_device_is_refused_when_the_trainer_is_built(device: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Trainer(lm_model(), TrainConfig(device=device))


def test_fp16_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match=r"precision='fp16' needs CUDA .*use 'bf16' on CPU"):
        Trainer(lm_model(), TrainConfig(precision="fp16", device="cpu"))


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match=r"does not support bfloat16; use precision='fp16'"):
        check_precision(TrainConfig(precision="bf16"), torch.device("cuda", 0))
