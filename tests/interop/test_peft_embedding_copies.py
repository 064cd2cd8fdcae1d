"""peft stores a copy of the base embedding beside an embedding LoRA (``save_embedding_layers``,
on by default when ``embed_tokens`` is a target): the import accepts it only where it is this base's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.interop import import_peft

from interop_helpers import assert_import_refused
from zoo import CASES

LLAMA = CASES["llama"]
COPY = "base_model.model.model.embed_tokens.base_layer.weight"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return LLAMA.output(model)


def _saved_with_peft_defaults(path: Path) -> torch.nn.Module:
    """A LoRA on the embedding and q_proj, trained in peft, saved with peft's defaults."""
    trained = get_peft_model(
        LLAMA.build(), PeftLoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    )
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        LLAMA.loss(trained).backward()
        opt.step()
    trained.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft announces that it saves the embedding
        trained.save_pretrained(path)
    assert COPY in load_file(path / "adapter_model.safetensors")
    return trained


def _rewrite_copy(path: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[COPY] = change(tensors[COPY])
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def test_an_unchanged_copy_of_the_base_embedding_is_accepted(tmp_path: Path) -> None:
    trained = _saved_with_peft_defaults(tmp_path)
    model = import_peft(LLAMA.build(), tmp_path)
    torch.testing.assert_close(_logits(model), _logits(trained), atol=1e-5, rtol=1e-5)
    assert (_logits(trained) - _logits(LLAMA.build())).abs().max() > 1e-3
    # The copy is the base's own weight: nothing of it is stored or trained by the adapter.
    assert not any("base_layer" in k for k in peftkit.adapter_state_dict(model))


def test_a_copy_in_a_narrower_dtype_is_accepted_when_it_is_the_rounded_base(
    tmp_path: Path,
) -> None:
    trained = _saved_with_peft_defaults(tmp_path)
    _rewrite_copy(tmp_path, lambda t: t.to(torch.bfloat16))
    model = import_peft(LLAMA.build(), tmp_path)
    torch.testing.assert_close(_logits(model), _logits(trained), atol=1e-5, rtol=1e-5)


def test_a_copy_that_differs_from_the_base_is_refused_with_the_difference(
    tmp_path: Path,
) -> None:
    _saved_with_peft_defaults(tmp_path)

    def nudged(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[3, 5] += 0.25
        return t

    _rewrite_copy(tmp_path, nudged)
    assert_import_refused(
        tmp_path,
        r"model\.embed_tokens: the file holds a copy of its base weight "
        r"model\.embed_tokens\.base_layer\.weight that differs from this model's "
        r"\(max difference 0\.25\).*import it into the base it was saved from",
    )


def test_a_copy_of_another_shape_is_refused(tmp_path: Path) -> None:
    _saved_with_peft_defaults(tmp_path)
    _rewrite_copy(tmp_path, lambda t: torch.cat([t, t[:2]]))
    assert_import_refused(tmp_path, r"model\.embed_tokens: .*shape \(52, 32\).*\(50, 32\)")
