"""Adapters on 16-bit bases (float32 adapter parameters by default, dtypes kept through save/load),
the Trainer with a gradient scaler that skips an overflowing step, and quantized bases loaded through
transformers' BitsAndBytesConfig. GPU-marked tests at the end run in benchmarks/gpu_check.sh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import TrainConfig, Trainer, apply_adalora, apply_lora, load_adapter, save_adapter

from trainer_data import lm_data
from zoo import CASES, TinyTransformer

QUIET = {"progress": False, "eval_every": None, "save_every": None}
LORA = {"r": 8, "targets": ["q_proj", "v_proj"]}


def _unchanged_after_one_step(model: nn.Module) -> float:
    """Fraction of LoRA A entries an AdamW step at lr 1e-5 leaves exactly as they were."""
    params = list(peftkit.trainable_parameters(model))
    before = {id(p): p.detach().clone() for p in params}
    opt = torch.optim.AdamW(params, lr=1e-5)
    CASES["llama"].loss(model).backward()
    opt.step()
    a = [p for n, p in model.named_parameters() if n.endswith("lora_A")]
    same = sum(int((p.detach() == before[id(p)]).sum()) for p in a)
    return same / sum(p.numel() for p in a)


def test_lora_on_a_bf16_base_keeps_float32_factors_that_move_at_small_lr() -> None:
    model = CASES["llama"].build().to(torch.bfloat16)
    apply_lora(model, **LORA)
    assert {p.dtype for p in peftkit.trainable_parameters(model)} == {torch.float32}
    assert CASES["llama"].output(model).dtype == torch.bfloat16  # the stream stays bf16
    assert _unchanged_after_one_step(model) == 0.0
    kept = CASES["llama"].build().to(torch.bfloat16)
    apply_lora(kept, **LORA, adapter_dtype="base")
    assert {p.dtype for p in peftkit.trainable_parameters(kept)} == {torch.bfloat16}
    assert _unchanged_after_one_step(kept) > 0.9  # bf16 rounds lr-1e-5 steps away


def test_float32_factors_on_a_bf16_base_compute_what_bf16_factors_do() -> None:
    model = CASES["llama"].build().to(torch.bfloat16)
    apply_lora(model, **LORA)
    other = CASES["llama"].build().to(torch.bfloat16)
    apply_lora(other, **LORA, adapter_dtype="base")
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), other.named_parameters(), strict=True):
            if p.requires_grad:
                p.normal_(0, 0.1)
                q.copy_(p)  # the same values, rounded to bf16 on both sides of the cast
    assert torch.equal(CASES["llama"].output(model), CASES["llama"].output(other))


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter"])
@pytest.mark.parametrize("policy", ["auto", "base"])
def test_save_and_load_keep_the_adapter_dtype(method: str, policy: str, tmp_path: Path) -> None:
    def build() -> nn.Module:
        model = CASES["llama"].build().to(torch.bfloat16)
        if method == "adapter":
            peftkit.apply_adapter(model, adapter_dtype=policy)
        elif method == "adalora":
            apply_adalora(model, total_steps=10, targets=["q_proj"], adapter_dtype=policy)
        else:
            apply_lora(model, **LORA, adapter_dtype=policy)
        return model

    model = build()
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    expected = torch.float32 if policy == "auto" else torch.bfloat16
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / "peftkit_model.safetensors")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {expected}
    fresh = CASES["llama"].build().to(torch.bfloat16)
    load_adapter(fresh, tmp_path)  # builds the adapter from its saved config, then loads it
    assert {p.dtype for p in peftkit.trainable_parameters(fresh)} == {expected}
    assert torch.equal(CASES["llama"].output(fresh), CASES["llama"].output(model))


def test_adapter_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match=r"adapter_dtype must be 'auto' .* or 'base'"):
        peftkit.LoraConfig(adapter_dtype="float32")  # type: ignore[arg-type]


# -- the gradient scaler --------------------------------------------------------------------------
def _overflow_at(model: nn.Module, step: int) -> dict[str, int]:
    """Make every gradient of one adapter tensor infinite during optimiser step ``step``."""
    seen = {"backward": 0}
    target = next(p for n, p in model.named_parameters() if n.endswith(".lam"))

    def hook(grad: torch.Tensor) -> torch.Tensor:
        seen["backward"] += 1
        return grad * float("inf") if seen["backward"] == step + 1 else grad

    target.register_hook(hook)
    return seen


def test_a_step_the_scaler_skips_runs_no_method_hook() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adalora(
        model, init_r=4, target_r=2, total_steps=6, t_init=1, t_final=2, delta_t=1,
        targets=["q_proj", "v_proj"],
    )  # fmt: skip
    method = peftkit.adapters(model)["default"]
    calls: list[int] = []
    original = method.on_step_end

    finite: list[bool] = []

    def spy(m: nn.Module, step: int) -> None:
        calls.append(step)
        original(m, step)
        if method._importance is not None:  # freed once the final ranks are fixed
            tensors = [*method._importance.sens, *method._importance.unc]
            finite.append(all(bool(torch.isfinite(t).all()) for t in tensors))

    method.on_step_end = spy  # type: ignore[method-assign]
    _overflow_at(model, step=2)
    config = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, task="causal_lm", **QUIET)
    trainer = Trainer(model, config)
    # fp16 needs CUDA in the Trainer; a CPU scaler reproduces exactly what it does on overflow
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.fit(lm_data())
    assert calls == [0, 1, 3, 4, 5]  # step 2 overflowed: its gradients reached no hook
    assert finite and all(finite)  # the importance EMA never saw the overflowing gradients
    assert trainer.scaler.get_scale() < 2.0**10


# -- transformers' BitsAndBytesConfig ---------------------------------------------------------------
def _tiny_llama(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load_quantized(path: Path, bits: int) -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    if bits == 4:
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu"
    )


def _train_lm(model: nn.Module, ids: torch.Tensor, steps: int) -> None:
    """AdamW on the adapters of a causal LM fed ``ids``; the loss must fall by a fifth."""
    opt = torch.optim.AdamW(list(peftkit.trainable_parameters(model)), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_lora_on_a_bitsandbytes_model_from_pretrained(bits: int, tmp_path: Path) -> None:
    path = _tiny_llama(tmp_path)
    model = _load_quantized(path, bits)
    assert peftkit.quant.base_kind(model.model.layers[0].self_attn.q_proj) is not None
    apply_lora(model, r=4, targets="all-linear")
    ids = torch.stack(lm_data(n=8, vocab=64))
    _train_lm(model, ids, steps=12)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = _load_quantized(path, bits)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out)
    report = peftkit.merge(fresh)
    assert not report.kept and len(report.requantized) == len(report.merged) == 14
    assert max(report.requantized.values()) < 0.5


# -- on CUDA (benchmarks/gpu_check.sh) --------------------------------------------------------------
def _cuda_bf16(method: str) -> nn.Module:
    model = CASES["llama"].build().to("cuda", torch.bfloat16)
    if method == "lora":
        apply_lora(model, **LORA)
    elif method == "adalora":
        apply_adalora(model, total_steps=20, t_init=2, t_final=5, delta_t=2, targets=["q_proj"])
    else:
        peftkit.apply_prefix(model, prefix_length=4)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "adalora", "prefix"])
def test_bf16_training_on_cuda(method: str) -> None:
    model = _cuda_bf16(method)
    ids = torch.stack(lm_data(n=8, vocab=32)).cuda()
    opt = torch.optim.AdamW(list(peftkit.trainable_parameters(model)), lr=1e-2)
    losses = []
    for step in range(15):
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        peftkit.step_hooks(model, step)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(v == v for v in losses) and losses[-1] < losses[0], losses


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision_on_cuda(precision: str) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adalora(
        model, init_r=4, target_r=2, total_steps=12, t_init=2, t_final=4, delta_t=2,
        targets=["q_proj", "v_proj"],
    )  # fmt: skip
    config = TrainConfig(
        max_steps=12, batch_size=4, lr=1e-2, task="causal_lm", device="cuda",
        precision=precision, **QUIET,
    )  # fmt: skip
    trainer = Trainer(model, config)
    trainer.fit(lm_data())
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.gpu
def test_qlora_on_a_bnb_4bit_base_on_cuda(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    path = _tiny_llama(tmp_path)
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cuda"
    )
    apply_lora(model, r=4, targets="all-linear")
    assert {p.dtype for p in peftkit.trainable_parameters(model)} == {torch.float32}
    ids = torch.stack(lm_data(n=8, vocab=64)).cuda()
    _train_lm(model, ids, steps=15)
    report = peftkit.merge(model)
    assert not report.kept and max(report.requantized.values()) < 0.5
