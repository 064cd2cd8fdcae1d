"""Reentrant activation checkpointing on models whose main input is not token ids (Whisper's
``input_features``, ViT's and CLIP's ``pixel_values``): the adapters get the gradients they get
without checkpointing, and the caller's tensors are left as they were."""

from __future__ import annotations

import pytest
import torch
import transformers

import peftkit
from peftkit import AdaLoraConfig, LoraConfig, MethodConfig, _compat

from families import FAMILIES

pytest.importorskip("transformers")

CONFIGS: dict[str, MethodConfig] = {
    "lora": LoraConfig(r=2, alpha=4),
    "adalora": AdaLoraConfig(init_r=2, target_r=1, total_steps=10, t_init=2, t_final=2),
}


def _grads(name: str, method: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict]:
    family = FAMILIES[name]
    model = family.build()
    peftkit.apply(model, CONFIGS[method])
    for p in peftkit.trainable_parameters(model):  # so LoRA's A gets a gradient too
        torch.nn.init.normal_(p, std=0.1)
    if checkpointing:
        _compat.enable_checkpointing(model, use_reentrant=True)
    model.train()
    inputs = family.inputs()
    family.output(model, inputs).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, inputs


# transformers 4.57's Whisper fails in backward under reentrant checkpointing even with the inputs
# requiring grad ("backward through the graph a second time"); docs/trainer.md names the gap.
_WHISPER_4X = pytest.mark.xfail(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x Whisper: reentrant checkpointing backward fails",
    strict=True,
)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", [pytest.param("whisper", marks=_WHISPER_4X), "vit", "clip_vision"])
def test_reentrant_checkpointing_gives_the_adapters_their_gradients(name: str, method: str) -> None:
    expected, _ = _grads(name, method, checkpointing=False)
    got, inputs = _grads(name, method, checkpointing=True)
    assert got.keys() == expected.keys() and expected
    for key, grad in expected.items():
        assert got[key] is not None, f"{key} got no gradient under checkpointing"
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-6)
    assert not any(t.requires_grad for t in inputs.values() if isinstance(t, torch.Tensor))


def test_the_hooks_act_only_while_checkpointing_trains_and_go_with_the_last_adapter() -> None:
    family = FAMILIES["vit"]
    model = family.build()
    peftkit.apply_lora(model, r=2, alpha=4)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, a, k: seen.append(k["pixel_values"].requires_grad),
                                    with_kwargs=True)  # fmt: skip
    model.train()
    family.output(model)
    _compat.enable_checkpointing(model, use_reentrant=True)
    family.output(model)
    model.eval()
    family.output(model)
    assert seen == [False, True, False]
    peftkit.unload(model)
    model.train()
    family.output(model)
    assert seen[-1] is False


def test_token_models_train_under_reentrant_checkpointing_and_keep_no_embedding_hook() -> None:
    family = FAMILIES["roberta"]
    expected, _ = _grads("roberta", "lora", checkpointing=False)
    got, _ = _grads("roberta", "lora", checkpointing=True)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-6)
    model = family.build()
    peftkit.apply_lora(model, r=2, alpha=4)
    _compat.enable_checkpointing(model, use_reentrant=True)
    model.train()
    family.output(model).sum().backward()
    hooks = model.get_input_embeddings()._forward_hooks.values()
    assert not [h for h in hooks if getattr(h, "__module__", "") == "peftkit.input_grads"]
