"""``peftkit demo``: every registered method, trained briefly on an embedded task, in one table.

The embedded default is a small Llama-shaped causal LM built from a transformers config with random
weights, and a learnable task (each token is followed by a fixed random permutation of it), so the
demo needs no downloads and no data files. ``--model DIR`` uses a local HF causal LM instead.

The task draws tokens from the first 16 ids of the vocabulary: a method has to learn both which tokens
occur (loss falls below ln 128) and the permutation (loss falls towards 0).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import load_adapter, save_adapter
from .core import apply, merge_and_unload
from .registry import methods, spec
from .summary import markdown_table, trainable_summary
from .trainer import Trainer
from .training.config import TrainConfig

VOCAB = 128
TASK_TOKENS = 16
TOLERANCE = 1e-4  # max |Δ| of logits after merge or save/load that still counts as reproduced


def default_model(seed: int = 0) -> nn.Module:
    """A 2-layer Llama-shaped causal LM (hidden 128, vocab 128), random weights, 0.33M parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model: nn.Module = LlamaForCausalLM(config)
    model.eval()
    return model


def local_model(directory: str) -> Callable[[], nn.Module]:
    """A loader for a local HF causal LM directory (no network)."""
    from transformers import AutoModelForCausalLM

    def load() -> nn.Module:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        model.eval()
        return model

    return load


def task_batches(batch: int, length: int, seed: int) -> Iterator[torch.Tensor]:
    """Token sequences where each token is followed by ``perm[token]`` (a fixed permutation)."""
    perm = torch.randperm(TASK_TOKENS, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.empty(batch, length, dtype=torch.long)
        ids[:, 0] = torch.randint(TASK_TOKENS, (batch,), generator=gen)
        for t in range(1, length):
            ids[:, t] = perm[ids[:, t - 1]]
        yield ids


@dataclass
class DemoRow:
    """One method's result; a method that raised has only ``error`` (its other fields unset)."""

    method: str
    trainable: int = 0
    percent: float = 0.0
    loss_start: float = float("nan")
    loss_end: float = float("nan")
    step_ms: float = float("nan")
    merge_diff: float | None = None
    reload_diff: float = float("nan")
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Ran, and merging and save/load reproduced the trained outputs."""
        diffs = [self.reload_diff] + ([] if self.merge_diff is None else [self.merge_diff])
        return self.error is None and all(d <= TOLERANCE for d in diffs)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(
    model: nn.Module, steps: int, lr: float, batches: Iterator[torch.Tensor]
) -> tuple[list[float], list[float]]:
    """Train with the Trainer (AdamW, constant lr, no clipping, on CPU); returns per-step losses and
    step times (s). The Trainer's step is the plain loop with the method hooks (docs/trainer.md)."""
    config = TrainConfig(
        max_steps=steps,
        lr=lr,
        schedule="constant",
        max_grad_norm=None,
        eval_every=None,
        save_every=None,
        progress=False,
        device="cpu",
    )
    trainer = Trainer(model, config, loss_fn=lm_loss)
    trainer.fit(batches)
    return [r["loss"] for r in trainer.history], [r["step_time_s"] for r in trainer.history]


def run_method(name: str, make_model: Callable[[], nn.Module], steps: int, lr: float) -> DemoRow:
    model = make_model()
    apply(model, spec(name).method_cls.demo_config(total_steps=steps), adapter_name="demo")
    summary = trainable_summary(model)
    losses, times = train(model, steps, lr, task_batches(8, 32, seed=1))
    probe = next(task_batches(4, 32, seed=99))
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        fresh = load_adapter(make_model(), tmp)
        with torch.no_grad():
            reload_diff = (fresh(input_ids=probe).logits - adapted).abs().max().item()
    model, report = merge_and_unload(model, report=True)
    with torch.no_grad():
        merge_diff = (model(input_ids=probe).logits - adapted).abs().max().item()
    return DemoRow(
        method=name,
        trainable=summary.trainable,
        percent=summary.percent,
        loss_start=losses[0],
        loss_end=statistics.fmean(losses[-5:]),
        step_ms=1000 * statistics.median(times[2:] or times),
        merge_diff=merge_diff if report.merged else None,
        reload_diff=reload_diff,
    )


def failed_row(name: str, err: Exception) -> DemoRow:
    """The row of a method that raised: its reason on one line, long messages shortened."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    return DemoRow(method=name, error=reason if len(reason) <= 200 else reason[:197] + "...")


def format_table(rows: list[DemoRow]) -> str:
    header = (
        "method",
        "trainable",
        "% of total",
        "loss start→end",
        "step ms",
        "merge",
        "save/load",
        "result",
    )
    body = []
    for r in rows:
        if r.error is not None:
            body.append((r.method, "–", "–", "–", "–", "–", "–", f"failed: {r.error}"))
            continue
        merge = "n/a (not mergeable)" if r.merge_diff is None else _check(r.merge_diff)
        body.append(
            (
                r.method,
                f"{r.trainable:,}",
                f"{r.percent:.3f}%",
                f"{r.loss_start:.3f}→{r.loss_end:.3f}",
                f"{r.step_ms:.1f}",
                merge,
                _check(r.reload_diff),
                "ok" if r.ok else "failed: outputs not reproduced",
            )
        )
    return markdown_table(header, body)


def _check(diff: float) -> str:
    return f"{'ok' if diff <= TOLERANCE else 'MISMATCH'} (max |Δ| {diff:.1e})"


def _run_or_fail(name: str, make_model: Callable[[], nn.Module], steps: int, lr: float) -> DemoRow:
    try:
        return run_method(name, make_model, steps, lr)
    except Exception as err:  # one method's failure is its row's result; the others still run
        return failed_row(name, err)


def run_demo(model_dir: str | None = None, steps: int = 40, lr: float = 1e-2) -> list[DemoRow]:
    """Run every registered method in turn and print the table; returns the rows (see ``ok``)."""
    make_model = local_model(model_dir) if model_dir else default_model
    template = make_model()
    n_params = sum(p.numel() for p in template.parameters())
    print(
        f"model: {type(template).__name__}, {n_params:,} parameters"
        f" ({'local ' + model_dir if model_dir else 'embedded default, random weights'})"
    )
    print(
        f"task: next token = fixed permutation of the current one; {steps} steps of AdamW lr={lr}\n"
    )
    rows = [_run_or_fail(name, lambda: copy.deepcopy(template), steps, lr) for name in methods()]
    print(format_table(rows))
    failed = [r.method for r in rows if not r.ok]
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return rows
