"""Batches that work out of the box: sequence / token classification, causal LM, plain models,
custom losses, data forms, adversarial training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import peftkit
from peftkit import TrainConfig, Trainer, losses
from peftkit.training.tasks import TaskLoss, forward

from trainer_data import adapter_tensors, classification_data, lm_data, lora_bert, lora_transformer
from zoo import CASES, TinyMLP, TinyTransformer

QUIET = {"progress": False, "eval_every": None, "save_every": None}


def _stack(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def test_sequence_classification_uses_the_models_own_loss() -> None:
    model = lora_bert()
    batch = _stack(classification_data(4))
    assert TaskLoss()(model, batch).item() == model(**batch).loss.item()
    result = Trainer(model, TrainConfig(max_steps=2, batch_size=4, **QUIET)).fit(
        classification_data(8)
    )
    assert result.step == 2


def _ner_model() -> nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForTokenClassification(config).eval()
    peftkit.apply_lora(model, r=4, targets=["query", "value"], modules_to_save=["classifier"])
    return model


def _ner_data(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 50, (8,), generator=gen)
        labels = torch.where(ids < 10, 1, torch.where(ids < 20, 2, 0))  # B-X / I-X / O by token
        labels[0] = labels[-1] = -100  # special tokens
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels}
        )
    return rows


def test_token_classification_trains_and_reports_span_scores() -> None:
    model = _ner_model()
    batch = _stack(_ner_data(3))
    own = model(**batch)
    by_hand = losses.cross_entropy(own.logits, batch["labels"])
    assert TaskLoss()(model, batch).item() == pytest.approx(by_hand.item(), rel=1e-6)
    metrics = peftkit.metrics.span_metrics(["O", "B-X", "I-X"])
    trainer = Trainer(
        model, TrainConfig(max_steps=3, batch_size=4, lr=1e-2, **QUIET), compute_metrics=metrics
    )
    trainer.fit(_ner_data(12))
    out = trainer.evaluate(_ner_data(6))
    assert {"loss", "precision", "recall", "f1", "token_accuracy"} <= set(out)


def test_causal_lm_without_labels_matches_hf_shifted_loss() -> None:
    model = CASES["gpt2"].build()
    peftkit.apply_lora(model, r=4)
    ids = torch.stack(lm_data(3))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    ours = TaskLoss()(model, {"input_ids": ids, "attention_mask": mask})
    theirs = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    fw = forward(model, {"input_ids": ids}, "causal_lm")
    preds, labels = peftkit.training.tasks.predictions(fw, {"input_ids": ids})
    assert preds.shape == labels.shape == (3, 9) and torch.equal(labels, ids[:, 1:])


def test_plain_models_with_pairs_dicts_and_float_labels() -> None:
    torch.manual_seed(0)
    mlp = TinyMLP()
    x, y = torch.randint(20, (4, 3)), torch.randint(5, (4, 3))
    assert TaskLoss()(mlp, (x, y)).item() == pytest.approx(losses.cross_entropy(mlp(x), y).item())
    # a dict with labels for a forward that does not take them: labels are held back
    assert TaskLoss()(mlp, {"input_ids": x, "labels": y}).item() == pytest.approx(
        losses.cross_entropy(mlp(x), y).item()
    )
    head = nn.Linear(4, 1)
    features, target = torch.randn(5, 4), torch.randn(5)
    assert forward(head, (features, target)).task == "regression"
    assert TaskLoss()(head, (features, target)).item() == pytest.approx(
        losses.mse(head(features), target).item()
    )
    multi = nn.Linear(4, 3)
    targets = torch.randint(2, (5, 3)).float()
    assert forward(multi, (features, targets)).task == "multi_label"


def test_missing_labels_error_names_the_fix() -> None:
    with pytest.raises(ValueError, match="add a 'labels' entry"):
        TaskLoss("classification")(TinyMLP(), {"input_ids": torch.randint(20, (2, 3))})
    with pytest.raises(TypeError, match="loss_fn"):
        TaskLoss()(TinyMLP(), "text")


def test_custom_loss_fn_trains_and_evaluates() -> None:
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        logits = model(batch)
        return losses.causal_lm_loss(logits, batch)

    model = lora_transformer()
    trainer = Trainer(model, TrainConfig(max_steps=2, batch_size=4, **QUIET), loss_fn=loss_fn)
    trainer.fit(lm_data(8))
    assert calls["n"] == 2
    assert trainer.evaluate(lm_data(4))["loss"] == pytest.approx(
        loss_fn(model, torch.stack(lm_data(4))).item(), rel=1e-5
    )


def test_dataloaders_keep_their_batch_size_and_collate_and_iterables_need_max_steps() -> None:
    seen: list[int] = []

    def collate(rows: list[torch.Tensor]) -> torch.Tensor:
        seen.append(len(rows))
        return torch.stack(rows)

    loader = DataLoader(lm_data(12), batch_size=3, shuffle=True, collate_fn=collate)
    Trainer(lora_transformer(), TrainConfig(epochs=1, task="causal_lm", **QUIET)).fit(loader)
    assert seen == [3, 3, 3, 3]
    batches = (torch.stack(lm_data(2, seed=s)) for s in range(10))
    with pytest.raises(ValueError, match="max_steps"):
        Trainer(lora_transformer(), TrainConfig(**QUIET)).fit(batches)
    result = Trainer(lora_transformer(), TrainConfig(max_steps=4, task="causal_lm", **QUIET)).fit(
        batches
    )
    assert result.step == 4


@pytest.mark.parametrize(("method", "calls_per_batch"), [(None, 1), ("fgm", 2), ("pgd", 4)])
def test_adversarial_training_option(method: str | None, calls_per_batch: int) -> None:
    calls = {"n": 0}
    default = TaskLoss()

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        return default(model, batch)

    model = lora_bert()
    config = TrainConfig(
        max_steps=2,
        batch_size=4,
        lr=1e-2,
        adversarial=method,
        adv_epsilon=0.5,
        adv_steps=3,
        **QUIET,
    )
    Trainer(model, config, loss_fn=loss_fn).fit(classification_data(8))
    assert calls["n"] == 2 * calls_per_batch
    embedding = model.bert.embeddings.word_embeddings
    assert not embedding._forward_hooks  # the attack's hook is gone after fit


def test_adversarial_needs_an_embedding() -> None:
    class NoEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with pytest.raises(ValueError, match="no nn.Embedding"):
        Trainer(NoEmbedding(), TrainConfig(max_steps=1, adversarial="fgm", **QUIET)).fit(
            [(torch.randn(2, 4), torch.tensor([0, 1]))]
        )


def test_rdrop_through_the_trainer() -> None:
    model = lora_bert()
    before = adapter_tensors(model)
    Trainer(
        model,
        TrainConfig(max_steps=2, batch_size=4, lr=1e-2, **QUIET),
        loss_fn=losses.RDropLoss(alpha=1.0),
    ).fit(classification_data(8))
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_trainer_runs_a_model_without_adapters() -> None:
    model = TinyTransformer()
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, TrainConfig(max_steps=1, batch_size=4, task="causal_lm", **QUIET)).fit(
        lm_data(4)
    )
    assert all(
        not torch.equal(a, p)
        for a, p in zip(before, model.parameters(), strict=True)
        if p.requires_grad
    )
