"""The public API, snapshotted: adding, removing or renaming a public name fails here until the
snapshot, CHANGELOG.md and (for a removal or rename) a deprecation are updated together.

Policy (docs/compatibility.md): a renamed or removed public name keeps working, with a
DeprecationWarning, for at least one minor release before it goes.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC: dict[str, list[str]] = {
    "peftkit": [
        "ALL_LINEAR",
        "AdaLoraConfig",
        "AdapterConfig",
        "AdapterLayer",
        "AdapterModule",
        "CheckpointError",
        "FullConfig",
        "IA3Config",
        "LoraConfig",
        "MergeReport",
        "Method",
        "MethodConfig",
        "NonFiniteLossError",
        "PlainModelError",
        "PrefixConfig",
        "SavedModule",
        "SwapMethod",
        "TargetError",
        "TargetedConfig",
        "TrainConfig",
        "TrainDefaults",
        "TrainResult",
        "TrainableSummary",
        "Trainer",
        "__version__",
        "active_adapters",
        "adapter_state_dict",
        "adapters",
        "apply",
        "apply_adalora",
        "apply_adapter",
        "apply_full",
        "apply_ia3",
        "apply_lora",
        "apply_prefix",
        "augment",
        "combine_lora",
        "compose",
        "delete_adapter",
        "disable_adapters",
        "ensemble",
        "fold_prefix",
        "load_adapter",
        "load_adapter_state_dict",
        "losses",
        "merge",
        "merge_and_unload",
        "methods",
        "metrics",
        "plain_state_dict",
        "print_trainable_parameters",
        "quant",
        "rank_pattern",
        "register_method",
        "regularizer",
        "save_adapter",
        "set_active",
        "step_hooks",
        "trainable_parameters",
        "trainable_summary",
        "unload",
        "unmerge",
    ],
    "peftkit.augment": [
        "AugmentedDataset",
        "Augmenter",
        "Delete",
        "EmbeddingNeighbours",
        "Insert",
        "Replace",
        "Swap",
        "WordNeighbours",
        "collate",
    ],
    "peftkit.interop": [
        "Converted",
        "InteropError",
        "PeftAdapter",
        "PeftConverter",
        "converters",
        "export_peft",
        "import_peft",
        "register_peft_converter",
    ],
    "peftkit.losses": [
        "DistillationLoss",
        "EWC",
        "EmbeddingAttack",
        "IGNORE_INDEX",
        "L2SP",
        "RDropLoss",
        "binary_cross_entropy",
        "causal_lm_loss",
        "cross_entropy",
        "distillation_kl",
        "find_input_embedding",
        "focal_loss",
        "kl_divergence",
        "mse",
        "sigmoid_focal_loss",
        "symmetric_kl",
    ],
    "peftkit.quant": [
        "BaseKind",
        "QuantizedMerge",
        "base_kind",
        "dequantize",
        "register_base_kind",
    ],
    "peftkit.metrics": [
        "ClassificationScores",
        "Scores",
        "SpanScores",
        "accuracy",
        "bio_spans",
        "classification_metrics",
        "classification_report",
        "ids_to_tags",
        "precision_recall_f1",
        "span_metrics",
        "span_scores",
    ],
}


@pytest.mark.parametrize("module", list(PUBLIC))
def test_the_public_names_are_exactly_the_snapshot(module: str) -> None:
    names = importlib.import_module(module).__all__
    assert len(names) == len(set(names)), f"{module}.__all__ lists a name twice"
    added, removed = (
        sorted(set(names) - set(PUBLIC[module])),
        sorted(set(PUBLIC[module]) - set(names)),
    )
    assert not added and not removed, (
        f"{module}: public API changed (added {added}, removed {removed}). If deliberate, update "
        "this snapshot and CHANGELOG.md; a removed or renamed name needs a deprecation first."
    )


@pytest.mark.parametrize("module", list(PUBLIC))
def test_every_public_name_resolves(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(imported, n)]
    assert not missing, f"{module} lists {missing} in __all__ but does not define them"
