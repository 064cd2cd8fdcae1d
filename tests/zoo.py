"""Tiny models for tests: hand-written ones and HF models built from configs (never downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Embedding -> two linear layers -> head. Output: (batch, seq, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(self.emb(input_ids)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """A hand-written decoder: embedding, 2 blocks (q/k/v/o_proj, up/down), lm_head."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, 4) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def gpt2_config() -> Any:
    """The zoo's tiny GPT-2 configuration (2 layers, width 32, vocabulary 50)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=50,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt2() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config())


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=3,
        )
    )


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=50,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        )
    )


def _ids(batch: int = 2, seq: int = 7, vocab: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A model family: how to build it (seeded), feed it, and read its output."""

    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    hf: bool = False
    head: list[str] = field(default_factory=list)  # a task head worth modules_to_save

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().eval()

    def output(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> torch.Tensor:
        out = model(**(inputs if inputs is not None else self.inputs()))
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.output(model).float().pow(2).mean()


CASES = {
    "mlp": Case("mlp", TinyMLP, lambda: {"input_ids": _ids()}),
    "transformer": Case("transformer", TinyTransformer, lambda: {"input_ids": _ids()}),
    "gpt2": Case("gpt2", _gpt2, lambda: {"input_ids": _ids()}, hf=True),
    "bert": Case(
        "bert",
        _bert,
        lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)},
        hf=True,
        head=["classifier"],
    ),
    "llama": Case("llama", _llama, lambda: {"input_ids": _ids()}, hf=True),
    "t5": Case(
        "t5", _t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5, seed=1)}, hf=True
    ),
}
