"""Training-step time of AdaLoRA (allocator included) against the floor and plain LoRA.

    python benchmarks/adalora_step.py             # Llama-shaped: 4 layers, hidden 512, vocab 8000,
                                                  # batch 8 x 256, on CPU
    python benchmarks/adalora_step.py --smoke     # a few seconds; the test suite runs this

A step is forward + loss (+ regulariser) + backward + optimizer.step() + step_hooks + zero_grad.
Variants, each on its own copy of one random-weight model, run interleaved (one step of each per
round, the order rotating), so machine noise hits them alike; ratios are medians of per-round ratios.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a shared machine
with ``--threads 1`` it ignores the time the process waits for a core.

- floor:   the frozen base with backward through every layer (the input embeddings' output requires
           grad) and no adapter: the least any in-layer method can cost.
- lora:    LoRA at r = init_r on every linear layer but the head, AdamW.
- adalora: AdaLoRA from init_r to target_r on the same layers, AdamW, orthogonality regulariser, and
           the rank allocator in step_hooks. The schedule starts pruning with the first measured
           step and ends after the last one (t_final = 0), so every measured step updates importance
           and every delta_t-th one masks.
- adalora-final: AdaLoRA after its final mask (the t_final phase): live triplets at the target
           budget (allocated beforehand from random gradients), hooks with nothing left to do.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import peftkit


@dataclass
class Variant:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer | None
    phases: dict[str, list[float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def step(self, ids: torch.Tensor, index: int) -> float:
        """One training step; records the time of each phase and returns the total (s)."""
        marks = [self.clock()]
        logits = self.model(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        reg = peftkit.regularizer(self.model) if self.opt is not None else None
        total = loss if reg is None else loss + reg
        marks.append(self.clock())
        total.backward()
        marks.append(self.clock())
        if self.opt is not None:
            self.opt.step()
        marks.append(self.clock())
        if self.opt is not None:
            peftkit.step_hooks(self.model, index)
            self.opt.zero_grad(set_to_none=True)
        marks.append(self.clock())
        names = ("forward", "backward", "optimizer", "hooks")
        for name, start, end in zip(names, marks, marks[1:], strict=False):
            self.phases.setdefault(name, []).append(end - start)
        self.phases.setdefault("step", []).append(marks[-1] - marks[0])
        return marks[-1] - marks[0]


def build_model(layers: int, hidden: int, vocab: int, seq: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32 + 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def floor(base: nn.Module) -> Variant:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return Variant("floor", model, None)


def with_adapter(name: str, base: nn.Module, apply: Callable[[nn.Module], object]) -> Variant:
    model = copy.deepcopy(base)
    apply(model)
    model.train()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-3)
    return Variant(name, model, opt)


def pruned(base: nn.Module, args: argparse.Namespace) -> Variant:
    """AdaLoRA whose final mask is already applied (ranks at the target budget on average)."""
    config = peftkit.AdaLoraConfig(
        init_r=args.init_r, target_r=args.target_r, total_steps=2, t_init=0, delta_t=1
    )
    variant = with_adapter("adalora-final", base, lambda m: peftkit.apply_adalora(m, config))
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        for p in peftkit.trainable_parameters(variant.model):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        peftkit.step_hooks(variant.model, step)
    variant.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    return variant


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    base = build_model(args.layers, args.hidden, args.vocab, args.seq)
    steps = args.warmup + args.rounds
    adalora = peftkit.AdaLoraConfig(
        init_r=args.init_r,
        target_r=args.target_r,
        total_steps=steps + 1,
        t_init=args.warmup,
        t_final=0,
        delta_t=args.delta_t,
    )
    variants = [
        floor(base),
        with_adapter("lora", base, lambda m: peftkit.apply_lora(m, r=args.init_r, alpha=16)),
        with_adapter("adalora", base, lambda m: peftkit.apply_adalora(m, adalora)),
        pruned(base, args),
    ]
    for variant in variants:
        variant.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    for index in range(steps):
        ids = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
        turn = index % len(variants)
        order = variants[turn:] + variants[:turn]
        for variant in order:
            variant.step(ids, index)
    return summarise(variants, args.warmup, peftkit.rank_pattern(variants[2].model))


def summarise(variants: list[Variant], warmup: int, ranks: dict[str, int]) -> dict[str, object]:
    measured = {v.name: {k: t[warmup:] for k, t in v.phases.items()} for v in variants}
    steps = {name: phases["step"] for name, phases in measured.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(steps[a], steps[b], strict=True))

    return {
        "median_ms": {
            name: {k: 1000 * statistics.median(t) for k, t in phases.items()}
            for name, phases in measured.items()
        },
        "mean_step_ms": {name: 1000 * statistics.fmean(t) for name, t in steps.items()},
        "ratios": {
            "adalora / floor": ratio("adalora", "floor"),
            "lora / floor": ratio("lora", "floor"),
            "adalora / lora": ratio("adalora", "lora"),
            "adalora-final / floor": ratio("adalora-final", "floor"),
            "adalora-final / lora": ratio("adalora-final", "lora"),
        },
        "live_ranks": sum(ranks.values()),
    }


def report(result: dict[str, object], args: argparse.Namespace) -> None:
    print(
        f"Llama-shaped: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch "
        f"{args.batch} x {args.seq}; {args.rounds} rounds after {args.warmup} warm-up; "
        f"{torch.get_num_threads()} threads; init_r {args.init_r} -> target_r {args.target_r}, "
        f"delta_t {args.delta_t}; {args.clock} clock"
    )
    medians: dict[str, dict[str, float]] = result["median_ms"]  # type: ignore[assignment]
    means: dict[str, float] = result["mean_step_ms"]  # type: ignore[assignment]
    cols = ("forward", "backward", "optimizer", "hooks", "step")
    print(f"{'median ms':<14}" + "".join(f"{c:>11}" for c in cols) + f"{'mean step':>11}")
    for name, phases in medians.items():
        cells = "".join(f"{phases[c]:>11.1f}" for c in cols)
        print(f"{name:<14}{cells}{means[name]:>11.1f}")
    for name, value in result["ratios"].items():  # type: ignore[attr-defined]
        print(f"{name}: {value:.3f}")
    print(f"adalora live triplets at the end: {result['live_ranks']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 3 rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.vocab, args.batch, args.seq = 1, 64, 128, 2, 16
        args.rounds, args.warmup, args.delta_t, args.threads = 3, 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = run(args)
    report(result, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
