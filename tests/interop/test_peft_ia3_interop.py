"""IA3 both ways with the real peft: the same outputs after training on either side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

import peftkit
from peftkit.interop import InteropError, export_peft, import_peft

from interop_helpers import TOL, assert_same_and_trained, logits, train
from zoo import CASES

# Llama: keys, values and the down projection (the paper's setting); GPT-2: Conv1D layers.
FIELDS: dict[str, dict[str, Any]] = {
    "llama": {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
    "gpt2": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_trained_in_peftkit_loads_in_peft_with_the_same_outputs(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = case.build()
    peftkit.apply_ia3(model, **FIELDS[name])
    train(model, case.loss)
    export_peft(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3"
    assert written["feedforward_modules"]
    assert set(written["feedforward_modules"]) <= set(written["target_modules"])
    loaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert_same_and_trained(case, logits(case, loaded), logits(case, model))


@pytest.mark.parametrize("name", list(FIELDS))
def test_trained_in_peft_imports_into_peftkit_with_the_same_outputs(
    name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    fields = FIELDS[name]
    peft_config = PeftIA3Config(
        target_modules=fields["targets"],
        feedforward_modules=fields["feedforward"],
        fan_in_fan_out=name == "gpt2",
    )
    trained = get_peft_model(case.build(), peft_config)
    train(trained, case.loss)
    trained.save_pretrained(tmp_path)
    model = import_peft(case.build(), tmp_path)
    assert_same_and_trained(case, logits(case, model), logits(case, trained))
    expected = logits(case, model)  # an ordinary peftkit adapter: it merges exactly
    peftkit.merge_and_unload(model)
    torch.testing.assert_close(logits(case, model), expected, **TOL)


def test_a_vector_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    case = CASES["llama"]
    model = case.build()
    peftkit.apply_ia3(model, **FIELDS["llama"])
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["feedforward_modules"] = []
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match=r"down_proj: ia3_l has shape \(1, \d+\)"):
        import_peft(case.build(), tmp_path)
