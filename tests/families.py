"""The architecture zoo: tiny random models of many transformers families, built from configs.

Each family is a ``Family``: a model type, the auto class that builds it, the config fields that
make it tiny, and what it takes as input. ``build`` returns None with the reason when the installed
transformers cannot build it (the test then skips with that reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
GQA = {"num_key_value_heads": 2}


@dataclass(frozen=True)
class Family:
    """One transformers family in the zoo."""

    name: str
    model_type: str
    auto: str  # an auto class of transformers: AutoModelForCausalLM, ...
    fields: dict[str, Any] = field(default_factory=dict)
    kind: str = "decoder"  # decoder | encoder | seq2seq | speech | vision | torch
    small: bool = True  # start from SMALL
    prefix: str | None = (
        None  # why prefix-tuning cannot apply (the expected refusal), None: it does
    )
    head: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        if self.kind == "torch":
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        config = transformers.AutoConfig.for_model(
            self.model_type, **({**SMALL, **self.fields} if self.small else self.fields)
        )
        model = getattr(transformers, self.auto).from_config(config).eval()
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = None  # greedy runs never stop early
            model.generation_config.pad_token_id = 0
        return model

    def inputs(self, batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
        if self.kind == "speech":
            return {
                "input_features": torch.randn(batch, 8, 8, generator=gen),
                "decoder_input_ids": torch.randint(1, 60, (batch, 3), generator=gen),
            }
        if self.kind == "torch":
            return {"src": torch.randn(batch, seq, 32, generator=gen)}
        ids = torch.randint(4, 60, (batch, seq), generator=gen)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(4, 60, (batch, 4), generator=gen)
        return out

    def output(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> torch.Tensor:
        out = model(**(inputs if inputs is not None else self.inputs()))
        if isinstance(out, torch.Tensor):
            return out
        for name in ("logits", "last_hidden_state", "text_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError(f"{self.name}: no tensor output in {type(out).__name__}")


_NO_CACHE = "no module of it takes one with an attention mask"
_WHISPER_DECODER = "takes no encoder_attention_mask"


def _decoder(name: str, model_type: str | None = None, **fields: Any) -> Family:
    return Family(name, model_type or name, "AutoModelForCausalLM", fields)


def _encoder(name: str, prefix: str | None = None, **fields: Any) -> Family:
    return Family(
        name, name, "AutoModelForSequenceClassification", fields, "encoder", prefix=prefix,
        head=("classifier",),
    )  # fmt: skip


_DISTILBERT = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "vocab_size": 64}
_WHISPER = {
    "vocab_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "num_mel_bins": 8, "max_source_positions": 4,
    "max_target_positions": 16, "decoder_start_token_id": 1, "pad_token_id": 0,
}  # fmt: skip
_BART = {
    "vocab_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "max_position_embeddings": 64, "decoder_start_token_id": 2,
}  # fmt: skip
_MARIAN = {**_BART, "pad_token_id": 0, "decoder_start_token_id": 0}
_T5 = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
       "decoder_start_token_id": 0}  # fmt: skip
_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": 16, "patch_size": 8}  # fmt: skip

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _decoder("gpt2"),
        _decoder("llama", **GQA),
        _decoder("mistral", **GQA, sliding_window=4),
        _decoder("mixtral", **GQA, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        _decoder("qwen2", **GQA),
        _decoder("qwen3", **GQA, head_dim=8),
        _decoder("gemma", num_key_value_heads=1, head_dim=8),
        _decoder("gemma2", **GQA, head_dim=8, sliding_window=4),
        _decoder("gemma3", "gemma3_text", **GQA, head_dim=8, sliding_window=4),
        _decoder("phi"),
        _decoder("phi3", **GQA, pad_token_id=0),
        _decoder("falcon"),  # multi-query: one key/value head
        _decoder("gpt_neox"),
        _decoder("opt", ffn_dim=64, word_embed_proj_dim=32),
        _decoder("bloom"),  # ALiBi, no position ids
        _decoder("gptj", rotary_dim=4),
        _decoder("starcoder2", **GQA, sliding_window=None),
        _decoder("olmo", **GQA),
        _decoder("granite", **GQA),
        _encoder("bert"),
        _encoder("roberta"),
        _encoder("electra"),
        _encoder("xlm-roberta"),
        _encoder("deberta-v2", prefix=_NO_CACHE),
        _encoder("albert", prefix=_NO_CACHE, embedding_size=16),
        Family("distilbert", "distilbert", "AutoModelForSequenceClassification", _DISTILBERT,
               "encoder", small=False, prefix=_NO_CACHE, head=("pre_classifier", "classifier")),
        Family("t5", "t5", "AutoModelForSeq2SeqLM", _T5, "seq2seq", small=False),
        Family("bart", "bart", "AutoModelForSeq2SeqLM", _BART, "seq2seq", small=False),
        Family("mbart", "mbart", "AutoModelForSeq2SeqLM", _BART, "seq2seq", small=False),
        Family("pegasus", "pegasus", "AutoModelForSeq2SeqLM", _BART, "seq2seq", small=False),
        Family("marian", "marian", "AutoModelForSeq2SeqLM", _MARIAN, "seq2seq", small=False),
        Family("whisper", "whisper", "AutoModelForSpeechSeq2Seq", _WHISPER, "speech", small=False,
               prefix=_WHISPER_DECODER),
        Family("vit", "vit", "AutoModel", _VIT, "vision", small=False, prefix=_NO_CACHE),
        Family("clip_vision", "clip_vision_model", "AutoModel", _VIT, "vision", small=False,
               prefix=_NO_CACHE),
        Family("clip_text", "clip_text_model", "AutoModel", {**SMALL}, "encoder", small=False,
               prefix=_NO_CACHE),
        Family("torch_encoder", "", "", {}, "torch", prefix="it is not a transformers model"),
    ]
}  # fmt: skip

DECODERS = [f for f in FAMILIES.values() if f.kind == "decoder"]
SEQ2SEQ = [f for f in FAMILIES.values() if f.kind == "seq2seq" and f.prefix is None]
PREFIX_FAMILIES = [f for f in FAMILIES.values() if f.prefix is None]


def builder(family: Family) -> Callable[[], nn.Module]:
    return lambda: family.build()
