"""Prefix-tuning a causal language model, then generating with the KV cache.

    python examples/prefix_generation.py            # a few hundred steps: the prefix learns the line
    python examples/prefix_generation.py --smoke    # a few steps, for the test suite

The model is a tiny Llama with random weights built from a config, over a small word vocabulary (no
downloads). The task: after any prompt that ends in "=>", continue with one fixed line. Only the
prefix trains — a few virtual tokens' keys and values in every attention layer — so everything the
model learns lives in those tensors; the base model's weights never change.

What it shows: ``apply_prefix`` with the MLP re-parametrisation (``mlp_hidden``), training with
``peftkit.Trainer`` (prompt tokens masked out of the loss), ``fold_prefix`` to drop the MLP after
training (bit-identical outputs), ``generate()`` on a left-padded batch with the KV cache (the same
tokens as without it), and saving the prefix and loading it onto a fresh base.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import peftkit

LINE = "prefixes steer a frozen model ."
WORDS = "red blue green cat dog bird river and hill stone tree cloud rain sun moon star road"
VOCAB = ["<pad>", "<eos>", "=>", *WORDS.split(), *LINE.split()]
PAD, EOS = 0, 1
ID = {w: i for i, w in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def decode(ids: list[int]) -> str:
    return " ".join(VOCAB[i] for i in ids if i not in (PAD, EOS))


def make_example(rng: random.Random) -> dict[str, list[int]]:
    """A random prompt ending in "=>", then the line; only the line's tokens are in the loss."""
    prompt = encode(" ".join(rng.choices(WORDS.split(), k=rng.randint(2, 8))) + " =>")
    target = [*encode(LINE), EOS]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pad on the right: input_ids with PAD, labels with -100, and an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(row: list[int], value: int) -> list[int]:
        return row + [value] * (width - len(row))

    return {
        "input_ids": torch.tensor([pad(e["input_ids"], PAD) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
        "labels": torch.tensor([pad(e["labels"], -100) for e in examples]),
    }


def fresh_model() -> nn.Module:
    torch.manual_seed(0)  # the same random "pretrained" weights every time
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        # Weights ten times larger than transformers' default initialisation (like a trained
        # model's), so that the frozen output layer can make confident predictions at all.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def prompts_batch(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts, as generate() wants them for a decoder-only model."""
    rows = [encode(p) for p in prompts]
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([[PAD] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }


def generate(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Greedy continuation: only the new tokens."""
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=PAD, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    steps = 3 if args.smoke else args.steps
    rng = random.Random(0)
    train_set = [make_example(rng) for _ in range(64 if args.smoke else 2000)]
    prompts = ["red cat =>", "river and hill =>", "star moon sun rain road dog =>"]
    batch = prompts_batch(prompts)

    model = fresh_model()
    print("before training:")
    for prompt, new in zip(prompts, generate(model, batch).tolist(), strict=True):
        print(f"  {prompt!r} -> {decode(new)!r}")

    # Only the prefix trains: 8 virtual tokens per layer, produced during training by a small MLP.
    peftkit.apply_prefix(model, prefix_length=8, mlp_hidden=128)
    print(peftkit.trainable_summary(model))
    config = peftkit.TrainConfig(max_steps=steps, batch_size=32, lr=args.lr, progress=False)
    trainer = peftkit.Trainer(model, config, collate_fn=collate)
    trainer.fit(train_set)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")

    # The MLP only serves training: fold it into plain key/value tensors, outputs bit-identical.
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        peftkit.fold_prefix(model)
        assert torch.equal(model(**batch).logits, before)
    print(f"folded the prefix MLP: {peftkit.trainable_summary(model).trainable:,} parameters left")

    new = generate(model, batch)  # the default: the KV cache holds the prefix, then each new token
    assert torch.equal(new, generate(model, batch, use_cache=False))
    print("after training (generate() with the KV cache; the same tokens as without it):")
    for prompt, row in zip(prompts, new.tolist(), strict=True):
        print(f"  {prompt!r} -> {decode(row)!r}")
    learned = sum(decode(row) == LINE for row in new.tolist())
    print(f"{learned}/{len(prompts)} continuations are the learned line {LINE!r}")

    with tempfile.TemporaryDirectory() as tmp:
        peftkit.save_adapter(model, tmp)
        reloaded = peftkit.load_adapter(fresh_model(), tmp)
        assert torch.equal(generate(reloaded, batch), new)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, before)
    print("saved the prefix and loaded it onto a fresh base: same logits, same generations")
    _, report = peftkit.merge_and_unload(reloaded, report=True)
    print(report)  # a prefix is not a weight update: it stays, and the report says why


if __name__ == "__main__":
    main()
