"""Prefix-tuning shared with the real HF ``peft`` on every decoder family of the zoo, both ways.

peftkit → peft: an adapter that counts positions after the prefix (peft's way) is copied as it is;
peft must give the same logits. peft → peftkit: a peft prefix with random keys/values is imported;
peftkit must give peft's logits. Where peft itself cannot run prefix-tuning on a family with the
installed transformers, or lays out its cache differently, the test skips with peft's reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import peftkit
from peftkit.interop import export_peft, import_peft
from peftkit.methods.prefix import Prefix

from families import DECODERS, Family
from test_families import _marked

TOL = {"atol": 1e-5, "rtol": 1e-5}
NAMES = [_marked(None, f.name) for f in DECODERS]
FAMILY = {f.name: f for f in DECODERS}


def _ids() -> torch.Tensor:
    return torch.randint(4, 60, (2, 5), generator=torch.Generator().manual_seed(2))


def _peft_logits(run: object) -> torch.Tensor:
    try:
        with torch.no_grad():
            return run()  # type: ignore[operator]
    except (ValueError, RuntimeError, TypeError, AttributeError) as err:
        pytest.skip(
            f"peft {peft.__version__} cannot run prefix-tuning on this family with transformers "
            f"{transformers.__version__}: {type(err).__name__}: {str(err)[:160]}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_peftkit_prefix_loads_in_peft_with_the_same_logits(name: str, tmp_path: Path) -> None:
    family: Family = FAMILY[name]
    model = family.build()
    peftkit.apply_prefix(model, prefix_length=3, init_std=0.5, positions_after_prefix=True)
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_peft(model, tmp_path, task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_virtual_tokens"] == 3
    loaded = PeftModel.from_pretrained(family.build(), tmp_path).eval()
    got = _peft_logits(lambda: loaded(input_ids=ids).logits)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_peft_prefix_imports_into_peftkit_with_the_same_logits(name: str, tmp_path: Path) -> None:
    family: Family = FAMILY[name]
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    try:
        theirs = get_peft_model(family.build(), config).eval()
    except (ValueError, TypeError, AttributeError) as err:
        pytest.skip(f"peft {peft.__version__} cannot set up prefix-tuning here: {err}")
    with torch.no_grad():
        for p in theirs.prompt_encoder.parameters():
            p.normal_(std=0.5)
    ids = _ids()
    expected = _peft_logits(lambda: theirs(input_ids=ids).logits)
    theirs.save_pretrained(tmp_path)
    ours = import_peft(family.build(), tmp_path)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert isinstance(peftkit.adapters(ours)["default"], Prefix)
