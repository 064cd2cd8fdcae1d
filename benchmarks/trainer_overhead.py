"""Trainer step vs the same step written by hand, alternating step by step in one process.

    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 5] [--device cpu|cuda]
    python benchmarks/trainer_overhead.py --smoke     # a few steps; the test suite runs this

Both train the demo's Llama-shaped model with LoRA on the demo task (AdamW, constant lr, no
clipping). Prints the median step time of each and their ratio; the difference is the Trainer's
per-step bookkeeping (logging, the non-finite check, hooks).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import peftkit
from peftkit import TrainConfig, Trainer
from peftkit.demo import default_model, lm_loss, task_batches


def hand_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, step: int
) -> float:
    start = time.perf_counter()
    loss = lm_loss(model, ids)
    reg = peftkit.regularizer(model)
    (loss if reg is None else loss + reg).backward()
    opt.step()
    peftkit.step_hooks(model, step)
    opt.zero_grad(set_to_none=True)
    loss.item()  # the Trainer reads the loss every step too
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 2, 2
    device = torch.device(args.device)
    base = default_model()
    peftkit.apply_lora(base, r=8)
    hand_model, trainer_model = copy.deepcopy(base).to(device), copy.deepcopy(base)
    hand_model.train()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(hand_model), lr=1e-2, weight_decay=0.0)
    config = TrainConfig(
        max_steps=1,
        lr=1e-2,
        schedule="constant",
        max_grad_norm=None,
        eval_every=None,
        save_every=None,
        progress=False,
        device=args.device,
    )
    trainer = Trainer(trainer_model, config, loss_fn=lm_loss)
    batches = task_batches(8, 32, seed=1)
    trainer.fit(batches)  # builds the optimiser; then steps are driven directly
    trainer_model.train()
    hand: list[float] = []
    ours: list[float] = []
    for step in range(args.rounds * args.steps + 3):  # alternate step by step: load drifts cancel
        hand_time = hand_step(hand_model, opt, next(batches).to(device), step)
        start = time.perf_counter()
        trainer.train_step([next(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # warm-up
            hand.append(hand_time)
            ours.append(time.perf_counter() - start)
    h, t = statistics.median(hand), statistics.median(ours)
    print(
        f"device {device}: hand-written step {1000 * h:.2f} ms, "
        f"Trainer step {1000 * t:.2f} ms, ratio {t / h:.3f}"
    )


if __name__ == "__main__":
    main()
