"""Three methods on one model: LoRA on attention, an adapter after the feed-forward, a prefix.

    python examples/compose_methods.py            # a few hundred steps
    python examples/compose_methods.py --smoke    # a few steps, for the test suite

The model is a tiny Llama with random weights built from a config (no downloads), trained as a
language model on a synthetic task: sequences that count upwards in steps of three, modulo the
vocabulary, so the next token follows from the last one.

What it shows: ``peftkit.compose`` applying LoRA, a bottleneck adapter and prefix-tuning under
three names; ``trainable_summary`` per adapter; a hand-written training loop (the same three calls
work for any mix of methods); switching adapters off and on; one checkpoint holding the whole stack,
loaded onto a fresh base with the same outputs; and a merge report saying what folded into the
weights (LoRA) and what stayed (the adapter and the prefix, with the reason).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import AdapterConfig, LoraConfig, PrefixConfig

VOCAB = 64


def fresh_model() -> nn.Module:
    torch.manual_seed(0)  # the same random "pretrained" weights every time
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # weights as large as a trained model's, not transformers' 0.02
    )
    return LlamaForCausalLM(config)


def batch_of_sequences(
    generator: torch.Generator, size: int = 16, length: int = 24
) -> torch.Tensor:
    """Rows that count upwards in steps of three from a random start: 5, 8, 11, ... (mod VOCAB)."""
    start = torch.randint(VOCAB, (size, 1), generator=generator)
    return (start + 3 * torch.arange(length)) % VOCAB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    args = p.parse_args(argv)
    steps = 3 if args.smoke else args.steps
    model = fresh_model()

    # One call, three methods, applied in order (all or none: a failing one removes the others).
    peftkit.compose(
        model,
        {
            "attn": LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]),
            "ffn": AdapterConfig(form="pfeiffer", bottleneck=16, layer_norm=True),  # preset place
            "prefix": PrefixConfig(prefix_length=4),
        },
    )
    print(peftkit.trainable_summary(model))

    # Any training loop: the optimiser gets the union of the adapters' parameters, and the two
    # hook calls give each method its say (none of these three needs them; AdaLoRA would).
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=args.lr)
    data = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = batch_of_sequences(data)
        loss = model(input_ids=ids, labels=ids).loss
        reg = peftkit.regularizer(model)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    model.eval()
    test = batch_of_sequences(torch.Generator().manual_seed(1), size=8)
    with torch.no_grad():
        out = model(input_ids=test, labels=test)
        print(f"held-out loss: all three {out.loss.item():.4f}", end="")
        for only in ["attn", "ffn", "prefix"]:
            peftkit.set_active(model, only)
            print(f", {only} alone {model(input_ids=test, labels=test).loss.item():.4f}", end="")
        peftkit.set_active(model, ["attn", "ffn", "prefix"])
        with peftkit.disable_adapters(model):
            print(f", base {model(input_ids=test, labels=test).loss.item():.4f}")
        expected = out.logits

    with tempfile.TemporaryDirectory() as tmp:
        # One checkpoint lists the three adapters in order, with their methods and configs.
        peftkit.save_adapter(model, tmp)
        reloaded = peftkit.load_adapter(fresh_model().eval(), tmp)
    print(f"reloaded adapters {list(peftkit.adapters(reloaded))} onto a fresh base", end="")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=test).logits, expected)
    print(": same outputs")

    # LoRA folds into q_proj / v_proj; the adapter (non-linear) and the prefix (extra keys and
    # values) cannot be expressed as a weight update, so they stay, and the report says why.
    reloaded, report = peftkit.merge_and_unload(reloaded, report=True)
    print(report)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=test).logits, expected, rtol=1e-4, atol=1e-4)
    print(f"after the merge: {list(peftkit.adapters(reloaded))} remain, same outputs")


if __name__ == "__main__":
    main()
