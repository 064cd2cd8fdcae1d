"""AdaLoRA adapters shared with the real HF ``peft`` package, both directions, after pruning.

Each test trains for the whole rank schedule in one library (8 steps: warm-up, pruning every step,
the final mask), so ranks differ per layer; converts through the files; loads in the other library
on a fresh copy of the base; and compares logits in float32 with ``atol=1e-5, rtol=1e-5``. peft
scales by ``lora_alpha / (init_r + 1e-5)`` where peftkit uses ``alpha / init_r`` (a relative 1e-5 /
init_r of the update) and orders the products differently; measured differences are below 1e-6.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.interop import InteropError, export_peft, import_peft
from peftkit.methods.adalora import AdaLoraLayer

from interop_helpers import TOL, assert_import_refused, assert_same_and_trained, edit_config, logits
from zoo import CASES, Case

SCHEDULE = {"init_r": 4, "target_r": 2, "total_steps": 8, "t_init": 1, "t_final": 2, "delta_t": 1}
PEFT_SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 1}


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    # peft warns about its own AdaLoRA files: rank_pattern keys ("<path>.lora_E") match no module
    # name, a layer pruned to rank 0 looks like an ungathered shard, GPT-2 needs fan_in_fan_out.
    with warnings.catch_warnings():
        for message in ("rank_pattern keys did not match", "invalid shape", "fan_in_fan_out"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        yield


def train_peftkit(case: Case, model: nn.Module, steps: int = 8) -> None:
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=0.05)
    model.train()
    for step in range(steps):
        (case.loss(model) + peftkit.regularizer(model)).backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad()
    model.eval()


def train_peft(case: Case, model: nn.Module, steps: int = 8) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        case.loss(model).backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()


# -- peftkit -> peft ---------------------------------------------------------------------------
EXPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gpt2": ({"targets": ["c_attn", "c_fc"], "alpha": 6.0, "dropout": 0.1}, {"task_type": "CAUSAL_LM"}),
    "bert": ({"targets": ["query", "value"], "modules_to_save": ["classifier"]}, {"task_type": "SEQ_CLS"}),
    "llama": ({"targets": ["q_proj", "v_proj", "down_proj"], "layers": [1]}, {}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPORTS))
def test_pruned_in_peftkit_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    fields, export_args = EXPORTS[name]
    model = case.build()
    peftkit.apply_adalora(model, **SCHEDULE, **fields)
    train_peftkit(case, model)
    ranks = peftkit.rank_pattern(model)
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # pruned unevenly
    export_peft(model, tmp_path, **export_args)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    loaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert_same_and_trained(case, logits(case, loaded), logits(case, model))


def test_a_reloaded_pruned_adapter_exports_too(tmp_path: Path) -> None:
    """Layers rebuilt from a checkpoint at their live rank no longer know which triplets survived;
    peft only needs how many."""
    case = CASES["gpt2"]
    model = case.build()
    peftkit.apply_adalora(model, **SCHEDULE, targets=["c_attn", "c_proj"])
    train_peftkit(case, model)
    peftkit.save_adapter(model, tmp_path / "ckpt")
    reloaded = peftkit.load_adapter(case.build(), tmp_path / "ckpt")
    export_peft(reloaded, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(case.build(), tmp_path / "peft").eval()
    assert_same_and_trained(case, logits(case, loaded), logits(case, model))


def test_an_unpruned_adapter_has_no_rank_pattern(tmp_path: Path) -> None:
    case = CASES["llama"]
    model = case.build()
    peftkit.apply_adalora(model, **SCHEDULE, targets=["q_proj"])
    train_peftkit(case, model, steps=1)  # still in warm-up
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    loaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(logits(case, loaded), logits(case, model), **TOL)


# -- peft -> peftkit ---------------------------------------------------------------------------
IMPORTS: dict[str, dict[str, Any]] = {
    "gpt2": {"target_modules": ["c_attn", "c_fc"], "lora_alpha": 6, "task_type": "CAUSAL_LM"},
    # SEQ_CLS makes peft add the classifier to modules_to_save by itself.
    "bert": {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "lora_dropout": 0.1},
    "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "lora_alpha": 16},
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_pruned_in_peft_imports_into_peftkit_with_the_same_logits(
    name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    trained = get_peft_model(case.build(), PeftAdaLoraConfig(**PEFT_SCHEDULE, **IMPORTS[name]))
    train_peft(case, trained)
    trained.save_pretrained(tmp_path)
    flags = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    model = import_peft(case.build(), tmp_path)
    assert_same_and_trained(case, logits(case, model), logits(case, trained))
    ranks = peftkit.rank_pattern(model)
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in flags.items()}
    config = peftkit.adapters(model)["default"].config
    assert config.init_r == 4 and config.total_steps == 8 and config.delta_t == 1
    # A normal peftkit adapter: ranks stay as imported (the schedule does not restart), it merges.
    peftkit.step_hooks(model, 0)
    assert peftkit.rank_pattern(model) == ranks
    expected = logits(case, model)
    peftkit.merge_and_unload(model)
    torch.testing.assert_close(logits(case, model), expected, **TOL)


def test_round_trip_through_the_peft_format_is_exact(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    peftkit.apply_adalora(
        model, **SCHEDULE, targets=["query", "key"], modules_to_save=["classifier"]
    )
    train_peftkit(case, model)
    export_peft(model, tmp_path)
    again = import_peft(case.build(), tmp_path)
    torch.testing.assert_close(logits(case, again), logits(case, model), rtol=0, atol=0)
    assert peftkit.rank_pattern(again) == peftkit.rank_pattern(model)
    before, after = peftkit.adapter_state_dict(model), peftkit.adapter_state_dict(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer = again.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, AdaLoraLayer) and layer.scaling == 16.0 / 4


# -- what cannot be converted ------------------------------------------------------------------
def _peft_adalora(path: Path, case: str = "llama", **fields: Any) -> Path:
    fields = {**PEFT_SCHEDULE, "target_modules": ["q_proj", "v_proj"], **fields}
    get_peft_model(CASES[case].build(), PeftAdaLoraConfig(**fields)).save_pretrained(path)
    return path


def test_target_r_above_init_r_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path = _peft_adalora(tmp_path)
    edit_config(path, target_r=6)
    assert_import_refused(path, "target_r=6 exceeds init_r=4.*raise init_r or lower target_r")


def test_non_positive_lora_alpha_is_refused(tmp_path: Path) -> None:
    path = _peft_adalora(tmp_path)
    edit_config(path, lora_alpha=0)
    assert_import_refused(path, "lora_alpha=0.*scales each module by its own current rank")


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_refused(tmp_path: Path) -> None:
    path = _peft_adalora(tmp_path)
    key = "model.layers.0.self_attn.q_proj.lora_E"
    edit_config(path, rank_pattern={key: [True, False, False, False]})
    assert_import_refused(path, "q_proj: the tensors have rank 4 but .* says 1")


def test_an_unknown_option_is_refused(tmp_path: Path) -> None:
    path = _peft_adalora(tmp_path)
    edit_config(path, use_dora=True)
    assert_import_refused(path, r"DoRA \(use_dora=True\) is not supported by peftkit's AdaLoRA")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_a_conv2d_adapter_is_refused(tmp_path: Path) -> None:
    fields = {**PEFT_SCHEDULE, "target_modules": ["conv", "head"]}
    get_peft_model(ConvNet(), PeftAdaLoraConfig(**fields)).save_pretrained(tmp_path)
    model = ConvNet()
    with pytest.raises(InteropError, match="conv is a Conv2d; peftkit's AdaLoRA imports Linear"):
        import_peft(model, tmp_path)
    assert not peftkit.adapters(model)
