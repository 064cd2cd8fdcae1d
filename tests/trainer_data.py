"""Tiny datasets for Trainer tests (deterministic, learnable, in memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import peftkit

from zoo import CASES, TinyTransformer


def lm_data(n: int = 32, length: int = 10, vocab: int = 50, seed: int = 0) -> list[torch.Tensor]:
    """Token sequences where each token is followed by (token * 7 + 3) % vocab: a learnable task."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.empty(length, dtype=torch.long)
        ids[0] = torch.randint(vocab, (1,), generator=gen)
        for t in range(1, length):
            ids[t] = (ids[t - 1] * 7 + 3) % vocab
        rows.append(ids)
    return rows


def classification_data(n: int = 24, seq: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """HF-style examples for the tiny BERT (3 classes: the label is the first token mod 3)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 50, (seq,), generator=gen)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(seq, dtype=torch.long),
                "labels": ids[0] % 3,
            }
        )
    return rows


def lora_transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyTransformer()
    peftkit.apply_lora(model, r=4, targets=["q_proj", "v_proj"])
    return model


def lora_bert(seed: int = 0) -> nn.Module:
    """Tiny BERT classifier (dropout 0.1, so RNG matters) with LoRA and a trained head."""
    model = CASES["bert"].build(seed)
    peftkit.apply_lora(model, r=4, targets=["query", "value"], modules_to_save=["classifier"])
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.adapter_state_dict(model).items()}
