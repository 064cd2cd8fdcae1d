"""The name lists written into converted configs select exactly the adapted modules."""

from __future__ import annotations

import pytest

from peftkit.interop.peft import InteropError, exact_names, pattern_names, suffix_match
from peftkit.interop.peft_lora import peft_pattern_value

UNIVERSE = [
    "model",
    "model.layers.0.q_proj",
    "model.layers.0.v_proj",
    "model.layers.1.q_proj",
    "model.layers.1.v_proj",
    "lm_head",
]


def test_leaf_names_where_they_are_exact_full_paths_elsewhere() -> None:
    every_q = ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    assert exact_names(UNIVERSE, every_q) == ["q_proj"]
    assert exact_names(UNIVERSE, [*every_q, "model.layers.1.v_proj"]) == [
        "q_proj",
        "model.layers.1.v_proj",
    ]
    assert exact_names(UNIVERSE, []) == []


def test_a_name_that_cannot_be_exact_is_an_error() -> None:
    # "b.x" as a suffix also selects "a.b.x": no name list picks "b.x" alone.
    with pytest.raises(InteropError, match="cannot name targets"):
        exact_names(["b.x", "a.b.x"], ["b.x"])


def test_peft_saved_module_rule_has_no_dot_boundary() -> None:
    def endswith(name: str, pattern: str) -> bool:
        return name.endswith(pattern)

    universe = ["classifier", "my_classifier"]
    assert exact_names(universe, ["classifier"], suffix_match) == ["classifier"]
    with pytest.raises(InteropError):
        exact_names(universe, ["classifier"], endswith)


def test_pattern_names_keep_only_values_that_differ_from_the_default() -> None:
    ranks = {
        "model.layers.0.q_proj": 8,
        "model.layers.1.q_proj": 8,
        "model.layers.0.v_proj": 4,
        "model.layers.1.v_proj": 2,
    }
    assert pattern_names(ranks, 4) == {"q_proj": 8, "model.layers.1.v_proj": 2}
    assert pattern_names(ranks, 8) == {"model.layers.0.v_proj": 4, "model.layers.1.v_proj": 2}
    assert pattern_names({"a.q": 1}, 1) == {}


def test_peft_pattern_rule_matches_after_a_dot_first_key_wins() -> None:
    patterns = {"q_proj": 8, "layers\\.1\\..*": 2}
    assert peft_pattern_value(patterns, "model.layers.1.q_proj", 4) == 8
    assert peft_pattern_value(patterns, "model.layers.1.v_proj", 4) == 2
    assert peft_pattern_value(patterns, "model.layers.0.v_proj", 4) == 4
    assert peft_pattern_value({"proj": 8}, "model.layers.0.q_proj", 4) == 4  # not after a dot
