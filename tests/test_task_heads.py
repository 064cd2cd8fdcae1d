"""Task heads train by default (``MethodConfig.train_head``).

An HF ``*For*`` model's task head (BERT's ``classifier``, ``score``, ``qa_outputs``) is freshly
initialised when the model is built for a task; an adapter that left it frozen would train
against a random projection. Every ``apply_*`` trains it in full and saves it with the adapter,
unless ``train_head=False``; a language model's output embeddings are never such a head.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig, SavedModule, apply_lora
from peftkit.interop import export_peft

from zoo import CASES, TinyMLP, gpt2_config

transformers = pytest.importorskip("transformers")

SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _bert(cls: str, **extra: Any) -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_labels=3, **SMALL, **extra)
    return getattr(transformers, cls)(config)


def _gpt2(cls: str) -> nn.Module:
    config = gpt2_config()
    config.pad_token_id = 0
    return getattr(transformers, cls)(config)


def _llama(cls: str) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_key_value_heads=2, **SMALL)
    config.pad_token_id = 0
    return getattr(transformers, cls)(config)


def _roberta_cls() -> nn.Module:
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_labels=2, **SMALL)
    return transformers.RobertaForSequenceClassification(config)


HEADS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "bert-seq-cls": (lambda: _bert("BertForSequenceClassification"), ["classifier"]),
    "bert-token-cls": (lambda: _bert("BertForTokenClassification"), ["classifier"]),
    "bert-qa": (lambda: _bert("BertForQuestionAnswering"), ["qa_outputs"]),
    "bert-multiple-choice": (lambda: _bert("BertForMultipleChoice"), ["classifier"]),
    "roberta-seq-cls": (_roberta_cls, ["classifier"]),
    "gpt2-seq-cls": (lambda: _gpt2("GPT2ForSequenceClassification"), ["score"]),
    "llama-seq-cls": (lambda: _llama("LlamaForSequenceClassification"), ["score"]),
    # Language models: the output embeddings are pretrained or tied to the input ones.
    "gpt2-lm": (lambda: _gpt2("GPT2LMHeadModel"), []),
    "llama-lm-untied": (lambda: _llama("LlamaForCausalLM"), []),
    "bert-mlm": (lambda: _bert("BertForMaskedLM"), []),
    "bert-pretraining": (lambda: _bert("BertForPreTraining"), []),
    "t5-seq2seq": (CASES["t5"].make, []),
    "bert-body": (lambda: _bert("BertModel"), []),
    "plain-torch": (TinyMLP, []),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_the_task_head_and_only_it_trains_by_default(name: str) -> None:
    make, expected = HEADS[name]
    torch.manual_seed(0)
    model = make()
    apply_lora(model)  # "all-linear"
    saved = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert [p for p in saved if isinstance(model.get_submodule(p), SavedModule)] == expected


def _data(n: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (n, 8), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    ids[:, 0] = 3 + labels * 5  # the label is readable from the first token
    return {"input_ids": ids, "labels": labels}


def _train(model: nn.Module, steps: int = 60, lr: float = 5e-3) -> tuple[float, float]:
    """Full-batch AdamW on the trainable parameters; (first loss, last loss)."""
    data = _data()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return losses[0], losses[-1]


def test_loss_falls_much_further_with_the_head_trained_than_without() -> None:
    results = {}
    for train_head in (None, False):
        model = CASES["bert"].build(seed=0)
        apply_lora(model, targets=["query", "value"], train_head=train_head)
        results[train_head] = _train(model)
    (first, default), (first_off, frozen) = results[None], results[False]
    assert first == pytest.approx(first_off)  # same model, same data, same start
    assert default < 0.5 * first  # the head learns the task
    assert first - default > 3 * (first_off - frozen)


def test_the_head_shows_in_trainable_summary_and_counts() -> None:
    model = CASES["bert"].build()
    apply_lora(model, targets=["query", "value"])
    row = peftkit.trainable_summary(model).adapters[0]
    head = sum(p.numel() for p in model.classifier.base.parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert row.details["saved"] == ["classifier"]
    assert row.params == head + lora
    assert "saved=['classifier']" in str(peftkit.trainable_summary(model))


def test_train_head_false_opts_out_and_true_needs_a_head() -> None:
    model = CASES["bert"].build()
    apply_lora(model, targets=["query"], train_head=False)
    assert not isinstance(model.classifier, SavedModule)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    with pytest.raises(ValueError, match="no task head.*modules_to_save"):
        apply_lora(CASES["gpt2"].build(), targets=["c_attn"], train_head=True)
    with pytest.raises(ValueError, match="train_head must be None"):
        LoraConfig(train_head=1)  # type: ignore[arg-type]


def test_a_head_named_in_modules_to_save_is_saved_once() -> None:
    model = CASES["bert"].build()
    apply_lora(model, targets=["query"], modules_to_save=["classifier", "pooler"])
    saved = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert sorted(p for p in saved if p in ("classifier", "bert.pooler")) == [
        "bert.pooler",
        "classifier",
    ]
    assert saved.count("classifier") == 1


def test_all_linear_leaves_the_head_to_train_in_full() -> None:
    torch.manual_seed(0)
    model = _roberta_cls()
    apply_lora(model)  # "all-linear" would otherwise adapt classifier.dense
    paths = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert "classifier" in paths
    assert not any(p.startswith("classifier.") for p in paths)


def test_a_suffix_that_also_names_head_layers_leaves_them_to_train_in_full() -> None:
    torch.manual_seed(0)
    model = _roberta_cls()
    apply_lora(model, targets=["dense"])  # RoBERTa's head has a dense layer too
    paths = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert "classifier" in paths and "classifier.dense" not in paths
    assert any(p.endswith("attention.output.dense") for p in paths)


def test_targeting_only_the_head_names_train_head_false() -> None:
    model = CASES["bert"].build()
    with pytest.raises(
        peftkit.TargetError, match="only modules of the task head.*train_head=False"
    ):
        apply_lora(model, targets=["classifier"])
    assert not peftkit.adapters(model)
    apply_lora(model, targets=["classifier"], train_head=False)  # LoRA on the head itself
    assert isinstance(model.classifier, peftkit.AdapterLayer)
    assert not isinstance(model.classifier, SavedModule)


def test_a_second_adapter_leaves_the_head_to_the_first() -> None:
    model = CASES["bert"].build()
    apply_lora(model, targets=["query"], adapter_name="a")
    with pytest.warns(UserWarning, match="'classifier' already trains in full with adapter 'a'"):
        apply_lora(model, targets=["value"], adapter_name="b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, targets=["key"], adapter_name="c", train_head=False)
    owners = {
        name: [layer.path for layer in m.layers if isinstance(layer, SavedModule)]
        for name, m in peftkit.adapters(model).items()
    }
    assert owners == {"a": ["classifier"], "b": [], "c": []}


def test_full_fine_tuning_trains_the_head_in_place_or_as_a_copy() -> None:
    everything = CASES["bert"].build()
    peftkit.apply_full(everything)
    assert not isinstance(everything.classifier, SavedModule)
    assert all(p.requires_grad for p in everything.classifier.parameters())
    top = CASES["bert"].build()
    peftkit.apply_full(top, top_layers=1)
    assert isinstance(top.classifier, SavedModule)


def test_save_and_load_give_identical_logits_with_the_trained_head(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = case.build()
    apply_lora(model, targets=["query", "value"])
    _train(model, steps=5)
    with torch.no_grad():
        expected = case.output(model)
    peftkit.save_adapter(model, tmp_path)
    loaded = peftkit.load_adapter(case.build(), tmp_path)
    assert isinstance(loaded.classifier, SavedModule)  # the trained head came back with it
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded), expected, rtol=0, atol=0)
        assert (expected - case.output(case.build())).abs().max() > 1e-3


def test_a_config_saved_before_train_head_existed_trains_no_head() -> None:
    assert LoraConfig.from_dict({"r": 4, "targets": ["query"]}).train_head is False
    assert LoraConfig.from_dict({"r": 4, "train_head": None}).train_head is None


def test_export_to_peft_as_seq_cls_loads_with_the_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    case = CASES["bert"]
    model = case.build()
    apply_lora(model, r=4, targets=["query", "value"])
    _train(model, steps=5)
    export_peft(model, tmp_path, task_type="SEQ_CLS")
    loaded = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    with torch.no_grad():
        expected = case.output(model)
        torch.testing.assert_close(case.output(loaded), expected, atol=1e-5, rtol=1e-5)
        assert (expected - case.output(case.build())).abs().max() > 1e-3
