"""``save_pretrained`` of a model with adapters writes the plain model it computes.

``from_pretrained`` of that directory (written by ``save_pretrained`` itself, by
``transformers.Trainer.save_model`` or by an HF Trainer checkpoint) gives the same logits; what no
plain model can hold is refused with ``save_adapter`` / ``merge_and_unload`` named, before anything
is written; and loading such a plain state dict back into a model with adapters is refused rather
than leaving the adapters as they were.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import PlainModelError, apply_lora

from helpers import perturb, snapshot
from zoo import CASES, Case

transformers = pytest.importorskip("transformers")

TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}  # the folded weight is rounded once

LORA: dict[str, dict[str, Any]] = {
    "bert": {"targets": ["query", "value"]},  # and the classifier, trained by default
    "gpt2": {"targets": ["c_attn", "c_proj"]},  # Conv1D: the update in the transposed layout
    "llama": {"targets": "all-linear"},
    "t5": {"targets": ["q", "v", "wo"]},
}


def _logits(case: Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model)


def _adapted(name: str, **fields: Any) -> nn.Module:
    model = CASES[name].build()
    apply_lora(model, **{**LORA[name], **fields})
    perturb(model)
    return model


def _reload(case: Case, model: nn.Module, directory: Path) -> nn.Module:
    loaded, info = type(model).from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return loaded.eval()


def _assert_reloads(case: Case, model: nn.Module, directory: Path) -> None:
    expected = _logits(case, model)
    torch.testing.assert_close(_logits(case, _reload(case, model, directory)), expected, **TOL)
    assert (expected - _logits(case, case.build())).abs().max() > 1e-3, "adapter had no effect"


@pytest.mark.parametrize("name", list(LORA))
def test_save_pretrained_reloads_with_the_same_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = _adapted(name)
    before = snapshot(model)
    model.save_pretrained(tmp_path)
    _assert_reloads(case, model, tmp_path)
    after = model.state_dict()  # torch's own state_dict is unchanged, and so is the model
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(layer.merged for layer in peftkit.adapters(model)["default"].layers)


def test_the_plain_state_dict_has_the_plain_models_keys() -> None:
    model = _adapted("bert")
    plain = peftkit.plain_state_dict(model)
    assert plain.keys() == CASES["bert"].build().state_dict().keys()
    query = "bert.encoder.layer.0.attention.self.query"
    layer = model.get_submodule(query)
    torch.testing.assert_close(plain[f"{query}.weight"], layer.base.weight + layer.delta_weight())
    assert torch.equal(plain["classifier.weight"], model.classifier.trained.weight)


def test_a_given_state_dict_is_folded_or_written_as_it_is(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = _adapted("bert")
    model.save_pretrained(tmp_path / "own", state_dict=model.state_dict())  # as the Trainer may
    _assert_reloads(case, model, tmp_path / "own")
    model.save_pretrained(tmp_path / "plain", state_dict=peftkit.plain_state_dict(model))
    _assert_reloads(case, model, tmp_path / "plain")
    with pytest.raises(PlainModelError, match="neither this model's nor its plain model's"):
        model.save_pretrained(tmp_path / "bad", state_dict={"no.such.weight": torch.zeros(1)})


def test_a_merged_adapter_is_not_folded_twice(tmp_path: Path) -> None:
    model = _adapted("llama")
    peftkit.merge(model)
    model.save_pretrained(tmp_path)
    _assert_reloads(CASES["llama"], model, tmp_path)


def test_stacked_adapters_and_full_fine_tuning_fold_together(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    peftkit.apply_full(model, top_layers=1, adapter_name="full")
    apply_lora(model, targets=["query"], adapter_name="a")
    apply_lora(model, targets=["query", "key"], adapter_name="b")
    perturb(model)
    model.save_pretrained(tmp_path)
    _assert_reloads(case, model, tmp_path)


def test_inactive_adapters_are_left_out_with_a_warning(tmp_path: Path) -> None:
    case = CASES["llama"]
    model = _adapted("llama", adapter_name="a")
    apply_lora(model, targets=["q_proj"], adapter_name="b")
    perturb(model, seed=1)
    peftkit.set_active(model, "a")
    with pytest.warns(UserWarning, match=r"\['b'\] are inactive"):
        model.save_pretrained(tmp_path)
    _assert_reloads(case, model, tmp_path)


REFUSED = {
    "bottleneck": ("bert", lambda m: peftkit.apply_adapter(m), "not linear in the base weight"),
    "prefix": ("llama", lambda m: peftkit.apply_prefix(m, prefix_length=2), "beside the model"),
    "tied": ("gpt2", lambda m: apply_lora(m, targets=["wte"]), "tied to another module"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_what_no_plain_model_holds_is_refused_before_anything_is_written(
    kind: str, tmp_path: Path
) -> None:
    name, apply, reason = REFUSED[kind]
    model = CASES[name].build()
    apply(model)
    with pytest.raises(PlainModelError, match=rf"{reason}.*save_adapter.*merge_and_unload"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    peftkit.save_adapter(model, tmp_path / "adapter")  # the named fix works


def test_a_deep_copy_saves_itself_and_unload_restores_save_pretrained(tmp_path: Path) -> None:
    case = CASES["llama"]
    model = _adapted("llama")
    twin = copy.deepcopy(model)
    perturb(twin, seed=3)
    twin.save_pretrained(tmp_path / "twin")
    _assert_reloads(case, twin, tmp_path / "twin")
    peftkit.unload(model)
    assert "save_pretrained" not in model.__dict__ and not model._load_state_dict_pre_hooks
    model.save_pretrained(tmp_path / "base")
    _assert_reloads_plain(case, model, tmp_path / "base")


def _assert_reloads_plain(case: Case, model: nn.Module, directory: Path) -> None:
    torch.testing.assert_close(
        _logits(case, _reload(case, model, directory)), _logits(case, model), rtol=0, atol=0
    )


def test_loading_a_plain_state_dict_into_the_adapted_model_is_refused(tmp_path: Path) -> None:
    model = _adapted("bert")
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path).state_dict()
    with pytest.raises(RuntimeError, match="plain model's.*peftkit.load_adapter"):
        model.load_state_dict(plain, strict=False)
    model.load_state_dict(snapshot(model))  # its own state dict still loads


# -- the HF Trainer ------------------------------------------------------------------------------
def _hf_trainer(model: nn.Module, out: Path, **args: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (16, 7), generator=gen)
    rows = [{"input_ids": i, "labels": int(i[0]) % 3} for i in ids]
    settings = {
        "output_dir": str(out),
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
    }
    arguments = transformers.TrainingArguments(**{**settings, **args})
    return transformers.Trainer(model=model, args=arguments, train_dataset=rows)


def test_hf_trainer_save_model_reloads_with_the_same_logits(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    apply_lora(model, targets=["query", "value"])
    trainer = _hf_trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    _assert_reloads(case, model.eval(), tmp_path / "final")


def test_hf_trainer_checkpoints_reload_and_resuming_into_adapters_is_refused(
    tmp_path: Path,
) -> None:
    case = CASES["bert"]
    model = case.build()
    apply_lora(model, targets=["query", "value"])
    _hf_trainer(model, tmp_path / "run", save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    _assert_reloads(case, model.eval(), checkpoint)
    again = case.build()
    apply_lora(again, targets=["query", "value"])
    with pytest.raises(RuntimeError, match="plain model's"):
        _hf_trainer(again, tmp_path / "run", max_steps=3).train(
            resume_from_checkpoint=str(checkpoint)
        )
