"""Trainable-parameter counts of published setups, each next to its closed form.

    python benchmarks/params.py             # every setup whose method is registered
    python benchmarks/params.py --vs-peft   # and HF peft's count where peft has the method

Models are built on the meta device (shapes only, no weights, no memory), so the biggest setup takes
a fraction of a second. A setup whose method is not registered (a trimmed install) shows its closed
form only; a setup whose fields no longer fit its method's config class says so (edit ``SETUPS``).

Closed forms (d: hidden size, L: layers, r: rank, m: bottleneck, p: prefix length):
    LoRA on W_q and W_v:        L · 2 · r · (d + d)           (Hu et al. 2021, Table 2: 0.3M / 0.8M)
    Houlsby adapters:           L · 2 · (2·m·d + m + d)       two per layer, biases included
    Pfeiffer adapters:          L · (2·m·d + m + d)           one per layer, after the feed-forward
    Prefix (keys and values):   L · 2 · p · d                 the stored prefix, no re-parametrisation

Adapters are counted without their optional input LayerNorm (``layer_norm=False``), as the closed
forms are; HF peft has no bottleneck adapters, so those rows have no peft count.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch
from torch import nn

import peftkit
from peftkit.registry import spec


@dataclass(frozen=True)
class Setup:
    name: str
    method: str  # registry name
    model: Callable[[], nn.Module]
    fields: dict[str, Any]  # the method's config fields for this setup
    closed_form: int
    formula: str
    paper: str = ""
    peft: Callable[[], Any] | None = None  # HF peft's config for the same setup


def roberta(size: str) -> Callable[[], nn.Module]:
    big = size == "large"
    shape = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16} if big else {}
    shape["intermediate_size"] = 4096 if big else 3072

    def build() -> nn.Module:
        from transformers import RobertaConfig, RobertaModel

        config = RobertaConfig(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, **shape
        )
        with torch.device("meta"):
            return RobertaModel(config)

    return build


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        return BertModel(BertConfig())


def gpt2_medium() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))


def _peft_lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])


def _peft_prefix() -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=10, task_type="CAUSAL_LM")


def _lora_qv(layers: int, d: int) -> int:
    return layers * 2 * 8 * (d + d)


def _bottleneck(layers: int, per_layer: int, m: int, d: int) -> int:
    return layers * per_layer * (2 * m * d + m + d)


SETUPS = [
    Setup(
        "LoRA r=8 on W_q, W_v — RoBERTa-base",
        "lora",
        roberta("base"),
        {"r": 8, "alpha": 16, "targets": ("query", "value")},
        _lora_qv(12, 768),
        "L·2·r·2d, L=12, d=768",
        "0.3M",
        _peft_lora,
    ),
    Setup(
        "LoRA r=8 on W_q, W_v — RoBERTa-large",
        "lora",
        roberta("large"),
        {"r": 8, "alpha": 16, "targets": ("query", "value")},
        _lora_qv(24, 1024),
        "L·2·r·2d, L=24, d=1024",
        "0.8M",
        _peft_lora,
    ),
    Setup(
        "Houlsby adapters m=64 — BERT-base",
        "adapter",
        bert_base,
        {"form": "houlsby", "bottleneck": 64, "layer_norm": False},
        _bottleneck(12, 2, 64, 768),
        "L·2·(2md+m+d), L=12, m=64, d=768",
    ),
    Setup(
        "Pfeiffer adapter m=48 (d/16) — BERT-base",
        "adapter",
        bert_base,
        {"form": "pfeiffer", "bottleneck": 48, "layer_norm": False},
        _bottleneck(12, 1, 48, 768),
        "L·(2md+m+d), L=12, m=48, d=768",
    ),
    Setup(
        "Prefix length 10 — GPT-2 medium",
        "prefix",
        gpt2_medium,
        {"prefix_length": 10},
        24 * 2 * 10 * 1024,
        "L·2·p·d, L=24, p=10, d=1024",
        "",
        _peft_prefix,
    ),
]


def config_for(setup: Setup) -> peftkit.MethodConfig:
    """The registered method's config with the setup's fields."""
    config: peftkit.MethodConfig = spec(setup.method).config_cls(**setup.fields)
    return config


def count(setup: Setup) -> tuple[int | None, int, str]:
    """(trainable with peftkit or None, model parameters, note)."""
    model = setup.model()
    total = sum(p.numel() for p in model.parameters())
    if setup.method not in peftkit.methods():
        return None, total, f"{setup.method!r} is not registered: closed form only"
    try:
        peftkit.apply(model, config_for(setup))
    except (TypeError, ValueError) as err:
        return None, total, f"slot out of date ({err}); edit SETUPS in benchmarks/params.py"
    trainable = peftkit.trainable_summary(model).trainable
    return trainable, total, "" if trainable == setup.closed_form else "differs from closed form"


def peft_count(setup: Setup) -> int | None:
    if setup.peft is None:
        return None
    from peft import get_peft_model

    wrapped = get_peft_model(setup.model(), setup.peft())
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vs-peft", action="store_true", help="add HF peft's count")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="where the JSON goes")
    p.add_argument("--smoke", action="store_true", help="same run (it takes a few seconds)")
    args = p.parse_args(argv)
    vs_peft = args.vs_peft and common.peft_available()
    header = ["setup", "model params", "trainable", "closed form", "formula", "paper"]
    header += ["peft"] if vs_peft else []
    rows, records = [], []
    for setup in SETUPS:
        trainable, total, note = count(setup)
        theirs = peft_count(setup) if vs_peft else None
        share = f" ({100 * trainable / total:.3f}%)" if trainable is not None else ""
        cells = [setup.name, f"{total / 1e6:.1f}M", common.fmt_int(trainable) + share]
        cells += [f"{setup.closed_form:,}", setup.formula, setup.paper or "–"]
        cells += [common.fmt_int(theirs)] if vs_peft else []
        rows.append(cells)
        record = {"setup": setup.name, "method": setup.method, "total": total}
        record.update(trainable=trainable, closed_form=setup.closed_form, peft=theirs, note=note)
        records.append(record)
    print(common.markdown_table(header, rows))
    for r in (r for r in records if r["note"]):
        print(f"- {r['setup']}: {r['note']}")
    common.write_json(args.out / "params.json", {"setups": records})
    # A count that disagrees with its closed form is a bug in one of them: fail loudly.
    mismatched = [r for r in records if r["trainable"] not in (None, r["closed_form"])]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
