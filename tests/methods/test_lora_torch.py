"""LoRA on nn.Conv1d and nn.MultiheadAttention: each compared with the plain torch module holding
the merged weights W + s·B A, in float64 where the comparison is of bookkeeping, not rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import apply_lora
from peftkit.methods.lora_torch import LoraConv1d, LoraMultiheadAttention
from peftkit.targeting import TargetError

from helpers import perturb

E, HEADS = 8, 2


class AttnNet(nn.Module):
    """A convolution over the sequence, self-attention on its output, a linear head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, E, 3, padding=1)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)  # (N, L, E)
        if not self.mha.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.mha(h, h, h, need_weights=False)
        return self.head(out.mean(dim=1 if self.mha.batch_first else 0))


def _x(n: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, length, generator=torch.Generator().manual_seed(1))


def _adapted(batch_first: bool = True, **fields: Any) -> AttnNet:
    model = AttnNet(batch_first).double()
    apply_lora(model, r=2, alpha=3, targets=["conv", "mha"], **fields)
    perturb(model, scale=0.5)
    return model


def _merged_copy(layer: LoraMultiheadAttention) -> nn.MultiheadAttention:
    """A plain attention module holding W_in + s·B A and W_out + s·B_o A_o."""
    attn = layer.base_layer()
    assert isinstance(attn, nn.MultiheadAttention)
    plain = nn.MultiheadAttention(
        attn.embed_dim, attn.num_heads, batch_first=attn.batch_first, dtype=torch.float64
    )
    plain.load_state_dict(attn.state_dict())
    with torch.no_grad():
        plain.in_proj_weight += layer.delta_weight()
        plain.out_proj.weight += layer.delta_out_weight()
    return plain


# -- nn.Conv1d ---------------------------------------------------------------------------------
def test_conv1d_factors_follow_the_base_convolution() -> None:
    model = AttnNet()
    apply_lora(model, r=2, targets=["conv"])
    layer = model.conv
    assert isinstance(layer, LoraConv1d)
    assert layer.lora_A.shape == (2, 4, 3) and layer.lora_B.shape == (E, 2, 1)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2),
        lambda: nn.Conv1d(4, 6, 5, stride=3),
        lambda: nn.Conv1d(4, 6, 1, bias=False),
    ],
)
def test_conv1d_equals_the_convolution_with_the_merged_weight(conv: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv()).double()
    apply_lora(model, r=3, alpha=5, targets=["0"])
    perturb(model, scale=0.5)
    layer = model[0]
    base = layer.base_layer()
    x = torch.randn(2, 4, 17, dtype=torch.float64)
    weight = base.weight + layer.delta_weight()
    want = F.conv1d(x, weight, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x[0]), want[0], atol=1e-12, rtol=0)  # unbatched (in, L)


@pytest.mark.parametrize(
    ("conv", "found"),
    [
        (lambda: nn.Conv1d(4, 6, 3, groups=2), r"groups=2, padding_mode='zeros'"),
        (
            lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"),
            "groups=1, padding_mode='circular'",
        ),
    ],
)
def test_conv1d_that_no_dense_update_fits_is_refused(conv: Any, found: str) -> None:
    model = nn.Sequential(conv())
    match = rf"LoRA on Conv1d '0' needs groups=1 and padding_mode='zeros' \(it has {found}"
    with pytest.raises(ValueError, match=match):
        apply_lora(model, targets=["0"])
    assert not peftkit.adapters(model)
    assert type(model[0]) is nn.Conv1d


# -- nn.MultiheadAttention ---------------------------------------------------------------------
def test_attention_layer_owns_both_projections_factors() -> None:
    model = AttnNet()
    apply_lora(model, r=2, targets=["mha"])
    layer = model.mha
    assert isinstance(layer, LoraMultiheadAttention)
    shapes = {
        n: tuple(p.shape) for n, p in peftkit.adapters(model)["default"].state_dict(model).items()
    }
    assert shapes == {
        "mha.lora_A": (2, E),
        "mha.lora_B": (3 * E, 2),
        "mha.lora_out_A": (2, E),
        "mha.lora_out_B": (E, 2),
    }
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "mha.lora_A", "mha.lora_B", "mha.lora_out_A", "mha.lora_out_B",
    ]  # fmt: skip


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "attn", "causal"])
def test_attention_equals_the_module_with_merged_weights(batch_first: bool, masks: str) -> None:
    model = _adapted(batch_first)
    layer = model.mha
    plain = _merged_copy(layer)
    n, length = 3, 5
    shape = (n, length, E) if batch_first else (length, n, E)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    kwargs: dict[str, Any] = {"need_weights": True, "average_attn_weights": False}
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True]] * n)
    elif masks == "attn":
        kwargs["attn_mask"] = torch.rand(length, length, dtype=torch.float64) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif masks == "causal":
        kwargs.update(attn_mask=causal, is_causal=True)
    got, got_w = layer(q, k, v, **kwargs)
    want, want_w = plain(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=0)
    with peftkit.disable_adapters(model):
        base, _ = layer(q, k, v, **kwargs)
    assert not torch.allclose(base, got)


def test_attention_gradients_reach_only_the_factors_and_training_lowers_the_loss() -> None:
    model = AttnNet()
    apply_lora(model, r=4, targets=["conv", "mha"])
    x, y = _x(8), torch.randint(3, (8,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=0.03)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "mha.base.in_proj_weight" in frozen
    assert all(model.get_parameter(n).grad is None for n in frozen)
    layer = model.mha
    assert layer.lora_out_B.abs().sum() > 0 and layer.lora_B.abs().sum() > 0  # both moved


def test_attention_merge_unmerge_and_unload_within_1e6() -> None:
    model = _adapted()
    x = _x().double()
    attn = model.mha.base_layer()
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        peftkit.merge(model)
        assert model.mha.merged
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        for key, value in attn.state_dict().items():
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        peftkit.merge_and_unload(model)
        assert type(model.mha) is nn.MultiheadAttention and type(model.conv) is nn.Conv1d
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_attention_disable_gives_the_base_and_save_load_the_adapter(tmp_path: Path) -> None:
    model = _adapted()
    x = _x().double()
    frozen = AttnNet().double().requires_grad_(False)  # as the adapted model's base
    with torch.no_grad():
        base = frozen(x)
        adapted = model(x)
        with peftkit.disable_adapters(model):
            torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    assert not torch.allclose(adapted, base)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(AttnNet().double(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, atol=0, rtol=0)


def test_two_attention_adapters_add_up_and_merge_in_either_state() -> None:
    model = _adapted()
    apply_lora(model, r=3, targets=["mha"], adapter_name="second")
    perturb(model, scale=0.5)
    outer = model.mha
    inner = outer.base
    assert isinstance(outer, LoraMultiheadAttention) and isinstance(inner, LoraMultiheadAttention)
    h = torch.randn(2, 5, E, dtype=torch.float64)
    plain = _merged_copy(inner)
    with torch.no_grad():
        plain.in_proj_weight += outer.delta_weight()
        plain.out_proj.weight += outer.delta_out_weight()
        want = plain(h, h, h)[0]
        torch.testing.assert_close(outer(h, h, h)[0], want, atol=1e-12, rtol=0)
        peftkit.merge(model, "default")  # the inner one only: the outer adds to merged weights
        torch.testing.assert_close(outer(h, h, h)[0], want, atol=1e-12, rtol=0)
        peftkit.merge(model)
        torch.testing.assert_close(outer(h, h, h)[0], want, atol=1e-12, rtol=0)
        peftkit.unmerge(model)
        torch.testing.assert_close(outer(h, h, h)[0], want, atol=1e-12, rtol=0)


def test_attention_with_separate_key_and_value_sizes_is_refused() -> None:
    model = nn.Module()
    model.mha = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=6)
    match = r"needs kdim == vdim == embed_dim .*embed_dim=8, kdim=4, vdim=6\. Add it to exclude"
    with pytest.raises(ValueError, match=match):
        apply_lora(model, targets=["mha"])
    assert type(model.mha) is nn.MultiheadAttention


def test_out_proj_alone_is_refused_naming_the_attention_module() -> None:
    # The attention reads out_proj.weight instead of calling out_proj: a Linear LoRA there would
    # train nothing that reaches the output.
    model = AttnNet()
    match = r"cannot adapt 'mha\.out_proj'.*exclude, and target the attention module 'mha' itself"
    with pytest.raises(TargetError, match=match):
        apply_lora(model, targets=["out_proj"])
    with pytest.raises(TargetError, match="cannot adapt 'mha.out_proj'"):
        apply_lora(model, targets="all-linear")
    assert not peftkit.adapters(model)


def test_attention_over_a_module_trained_in_full_is_refused() -> None:
    model = AttnNet()
    apply_lora(model, targets=["conv"], modules_to_save=["mha"])
    match = (
        r"LoRA on nn\.MultiheadAttention 'mha' cannot sit over SavedModule \(adapter 'default'\)"
    )
    with pytest.raises(ValueError, match=match):
        apply_lora(model, targets=["mha"], adapter_name="second")


def test_attention_is_not_merged_for_good_into_weights_another_adapter_restores() -> None:
    # A full fine-tune that keeps the original in_proj_weight puts it back when it is unloaded,
    # which would drop an update merged into it for good.
    model = AttnNet().double()
    peftkit.apply(model, peftkit.FullConfig(modules=["mha"]), adapter_name="full")
    apply_lora(model, r=2, targets=["mha"], adapter_name="lora")
    perturb(model, scale=0.5)
    x = _x().double()
    with torch.no_grad():
        expected = model(x)
        model, report = peftkit.merge_and_unload(model, "lora", report=True)
        assert "trained in place by an adapter that keeps the original" in report.kept["lora:mha"]
        assert isinstance(model.mha, LoraMultiheadAttention)
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_plain_state_dict_folds_both_projections() -> None:
    model = _adapted()
    x = _x().double()
    fresh = AttnNet().double()
    fresh.load_state_dict(peftkit.plain_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-12, rtol=0)


def test_combine_lora_refuses_attention_layers() -> None:
    model = _adapted()
    with pytest.raises(ValueError, match=r"combine_lora: 'default' adapts nn\.MultiheadAttention"):
        peftkit.combine_lora(model, {"default": 1.0}, "sum")


def test_float32_factors_on_a_bfloat16_attention() -> None:
    model = AttnNet().to(torch.bfloat16)
    apply_lora(model, r=2, targets=["mha"])
    layer = model.mha
    assert layer.lora_A.dtype == torch.float32
    perturb(model, scale=0.5)
    h = torch.randn(2, 5, E, dtype=torch.bfloat16)
    out = layer(h, h, h)[0]
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


# -- inside nn.TransformerEncoderLayer -----------------------------------------------------------
def _encoder() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("enc", nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True))
    model.add_module("head", nn.Linear(E, 3))
    return model


def _merged_encoder(model: nn.Module) -> nn.Module:
    plain = _encoder()
    plain.load_state_dict(peftkit.plain_state_dict(model))
    return plain


@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_self_attention_of_an_encoder_layer_is_adapted_in_every_mode(mode: str) -> None:
    # In eval mode without grad the encoder layer takes its fast path, which reads
    # self_attn.in_proj_weight itself; the adapter keeps it off that path, so the output is the
    # merged module's, never the base's.
    assert torch.backends.mha.get_fastpath_enabled()
    model = _encoder()
    apply_lora(model, r=2, targets=["self_attn"])
    perturb(model, scale=0.5)
    plain, base = _merged_encoder(model).eval(), _encoder().eval()
    x = torch.randn(2, 5, E)
    model.train(mode == "train")
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        got = model(x)
    with torch.no_grad():
        want, unadapted = plain(x), base(x)  # both on torch's fast path
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.detach(), unadapted, atol=1e-3)


def test_encoder_layer_merge_and_unload_gives_back_the_fast_path_module() -> None:
    model = _encoder()
    apply_lora(model, r=2, targets=["self_attn"])
    perturb(model, scale=0.5)
    model.eval()
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = model(x)
        peftkit.merge_and_unload(model)
        assert type(model.enc.self_attn) is nn.MultiheadAttention
        assert not model.enc.self_attn._forward_pre_hooks
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_other_encoder_layer_modules_stay_refused_while_its_fast_path_is_on() -> None:
    model = _encoder()
    with pytest.raises(TargetError, match=r"cannot adapt 'enc\.linear1'.*fast path"):
        apply_lora(model, targets=["self_attn", "linear1"])
    assert not peftkit.adapters(model)


def test_a_stack_of_encoder_layers_with_a_padding_mask_uses_the_adapted_weights() -> None:
    # nn.TransformerEncoder turns a padded batch into a nested tensor in eval mode when its layers
    # could take the fast path; the adapted layers then compute on it on the slow path.
    def stack() -> nn.TransformerEncoder:
        torch.manual_seed(0)
        one = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(one, 2, enable_nested_tensor=True).eval()

    model = stack()
    apply_lora(model, r=2, targets=["self_attn"])
    perturb(model, scale=0.5)
    plain = stack()
    plain.load_state_dict(peftkit.plain_state_dict(model))
    x = torch.randn(2, 5, E)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        got = model(x, src_key_padding_mask=mask)
        torch.testing.assert_close(got, plain(x, src_key_padding_mask=mask), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, stack()(x, src_key_padding_mask=mask), atol=1e-3)
