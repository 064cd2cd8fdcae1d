"""Per-method training defaults: TrainConfig(lr=None) takes the lr the model's methods declare."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import peftkit
from peftkit import TrainConfig, TrainDefaults, Trainer
from peftkit.registry import spec
from peftkit.training.defaults import FALLBACK_LR, resolve

from trainer_data import classification_data, lora_bert
from zoo import CASES, TinyMLP


def _bert() -> nn.Module:
    return CASES["bert"].build(0)


def test_every_registered_method_declares_a_positive_lr() -> None:
    built_in = [
        n for n in peftkit.methods() if spec(n).config_cls.__module__.startswith("peftkit.")
    ]
    assert {"lora", "adalora", "adapter", "prefix", "full", "ia3"} <= set(built_in)
    for name in built_in:  # other tests register methods of their own
        declared = spec(name).config_cls.train_defaults
        assert isinstance(declared, TrainDefaults), name
        assert declared.lr > 0 and declared.why, name


def test_train_defaults_refuses_a_bad_lr() -> None:
    with pytest.raises(ValueError, match="lr must be a positive finite number, got 0"):
        TrainDefaults(lr=0)


def test_one_method_gives_its_default() -> None:
    config, line = resolve(lora_bert(), TrainConfig())
    assert config.lr == peftkit.LoraConfig.train_defaults.lr == 1e-3  # type: ignore[union-attr]
    assert line == "lr=0.001 (default for lora); set TrainConfig(lr=...) to choose another"
    full = peftkit.apply_full(_bert())
    assert resolve(full, TrainConfig())[0].lr == 5e-5


def test_a_config_whose_rate_depends_on_its_fields_answers_per_instance() -> None:
    # The plain prefix and the prefix through an MLP want different rates; the Trainer asks the
    # config on the model, not its class.
    plain = peftkit.PrefixConfig()
    mlp = peftkit.PrefixConfig(mlp_hidden=32)
    assert plain.training_defaults() is peftkit.PrefixConfig.train_defaults
    assert plain.training_defaults().lr == 3e-2  # type: ignore[union-attr]
    assert mlp.training_defaults() is peftkit.PrefixConfig.mlp_train_defaults
    assert mlp.training_defaults().lr == 5e-3
    for config, lr in ((plain, 3e-2), (mlp, 5e-3)):
        model = peftkit.apply_prefix(_bert(), config)
        resolved, line = resolve(model, TrainConfig())
        assert resolved.lr == lr and line is not None and f"lr={lr:g} (default for prefix)" in line
    # Every other config answers with its class's declaration.
    assert peftkit.LoraConfig().training_defaults() is peftkit.LoraConfig.train_defaults


def test_an_explicit_lr_wins_untouched() -> None:
    config = TrainConfig(lr=0.02, max_steps=3)
    resolved, line = resolve(lora_bert(), config)
    assert resolved is config and line is None


def test_methods_that_disagree_give_the_smallest_and_name_each() -> None:
    model = _bert()
    peftkit.apply_lora(model, targets=["query"], adapter_name="a")
    peftkit.apply_ia3(model, targets=["key"], adapter_name="b", train_head=False)
    config, line = resolve(model, TrainConfig())
    assert config.lr == 1e-3
    assert line == (
        "lr=0.001 (the smallest of the methods' defaults: lora 0.001, ia3 0.03); "
        "set TrainConfig(lr=...) to choose another"
    )


def test_a_plain_model_and_an_undeclared_method_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    config, line = resolve(TinyMLP(), TrainConfig())
    assert config.lr == FALLBACK_LR == 1e-4
    assert line is not None and "no adapter on the model" in line
    monkeypatch.setattr(peftkit.LoraConfig, "train_defaults", None)
    config, line = resolve(lora_bert(), TrainConfig())
    assert config.lr == FALLBACK_LR
    assert line is not None and "lora declares no train_defaults: fallback 0.0001" in line


def test_train_config_lr_defaults_to_none_and_still_validates() -> None:
    assert TrainConfig().lr is None and TrainConfig() == TrainConfig()
    assert TrainConfig().to_dict()["lr"] is None
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        TrainConfig(lr=-1.0)


def _fit(model: nn.Module, **kw: Any) -> Trainer:
    trainer = Trainer(model, TrainConfig(**{"max_steps": 2, "batch_size": 4, **kw}))
    trainer.fit(classification_data(8))
    return trainer


def test_fit_trains_with_the_default_and_says_so_once(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peftkit.trainer"):
        trainer = _fit(lora_bert(), progress=True)
    line = "lr=0.001 (default for lora); set TrainConfig(lr=...) to choose another"
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [1e-3] * len(
        trainer.optimizer.param_groups
    )
    assert trainer.config.lr == 1e-3 and trainer.requested.lr is None
    assert capsys.readouterr().err.count(line) == 1
    assert [r.getMessage() for r in caplog.records] == [line]


def test_fit_with_an_explicit_lr_says_nothing(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peftkit.trainer"):
        trainer = _fit(lora_bert(), lr=0.02, progress=True)
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {0.02}
    assert "lr=" not in capsys.readouterr().err and not caplog.records


def test_progress_off_keeps_stderr_quiet_but_logs(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peftkit.trainer"):
        _fit(lora_bert(), progress=False)
    assert capsys.readouterr().err == ""
    assert len(caplog.records) == 1


def _saved_lr(out: Path, step: int) -> Any:
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["config"][
        "lr"
    ]


@pytest.mark.parametrize("first_lr", [None, 1e-3])
def test_resume_with_the_default_sees_no_change(tmp_path: Path, first_lr: float | None) -> None:
    """The checkpoint holds the resolved lr, so resuming with lr unset (or after a run that gave
    the same lr explicitly) compares equal: no 'changed settings' warning."""
    kw = {"output_dir": str(tmp_path), "save_every": 1, "progress": False}
    _fit(lora_bert(), lr=first_lr, **kw)
    assert _saved_lr(tmp_path, 2) == 1e-3
    model = lora_bert()
    trainer = Trainer(model, TrainConfig(max_steps=4, batch_size=4, **kw))  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(classification_data(8), resume_from="latest")
    changed = [str(w.message) for w in caught if "changed settings" in str(w.message)]
    assert changed == [
        f"{changed[0].split(' with changed')[0]} with changed settings, honoured "
        "from this step on: max_steps 2 -> 4"
    ]  # the one real change; lr is none
    assert _saved_lr(tmp_path, 4) == 1e-3


def test_resume_after_another_lr_names_the_change(tmp_path: Path) -> None:
    kw = {"output_dir": str(tmp_path), "save_every": 1, "progress": False}
    _fit(lora_bert(), lr=0.02, **kw)
    trainer = Trainer(lora_bert(), TrainConfig(max_steps=4, batch_size=4, **kw))  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=r"lr 0\.02 -> 0\.001"):
        trainer.fit(classification_data(8), resume_from="latest")
