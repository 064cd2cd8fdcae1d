"""peftkit.losses: each loss against hand-computed values or torch's own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import apply_lora, losses

from zoo import CASES, TinyMLP


def _logsumexp(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


def test_cross_entropy_by_hand_with_ignore_index() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]])
    labels = torch.tensor([0, -100, 1])
    expected = ((_logsumexp([2, 0, -1]) - 2.0) + (_logsumexp([1, 3, 0]) - 3.0)) / 2
    assert losses.cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_label_smoothing_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    eps = 0.1
    log_p = [v - _logsumexp([2, 0, -1]) for v in (2.0, 0.0, -1.0)]
    expected = (1 - eps) * -log_p[0] + eps * -sum(log_p) / 3
    got = losses.cross_entropy(logits, torch.tensor([0]), label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_token_shape_matches_torch_and_rejects_misaligned_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(7, (2, 5), generator=gen)
    labels[0, :2] = -100
    ref = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, label_smoothing=0.2)
    assert torch.allclose(losses.cross_entropy(logits, labels, label_smoothing=0.2), ref)
    none = losses.cross_entropy(logits, labels, reduction="none")
    assert none.shape == labels.shape and none[0, :2].eq(0).all()
    with pytest.raises(ValueError, match="task='causal_lm'"):
        losses.cross_entropy(logits, labels[:, 1:])


def test_causal_lm_loss_shifts_and_masks_padding() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 6, generator=gen)
    ids = torch.tensor([[3, 1, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    log_p = torch.log_softmax(logits, -1)[0]
    expected = -(log_p[0, 1] + log_p[1, 4]) / 2  # position 2 would predict padding: ignored
    assert losses.causal_lm_loss(logits, ids, mask).item() == pytest.approx(expected.item())


def test_binary_cross_entropy_and_mse_by_hand() -> None:
    x, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(2) + (2 + math.log1p(math.exp(-2)))) / 2
    assert losses.binary_cross_entropy(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert losses.mse(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])).item() == 2.5
    with pytest.raises(ValueError, match="differ"):
        losses.mse(torch.zeros(3), torch.zeros(2))


def test_focal_loss_by_hand_and_gamma_zero_is_cross_entropy() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, -100])
    p = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0))]
    expected = sum(-((1 - q) ** 2) * math.log(q) for q in p) / 2
    assert losses.focal_loss(logits, labels, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    alpha = torch.tensor([0.25, 0.75])
    assert losses.focal_loss(logits, labels, alpha=alpha).item() == pytest.approx(0.25 * expected)
    assert torch.allclose(
        losses.focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels)
    )


def test_sigmoid_focal_loss_by_hand() -> None:
    x, y = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.0])
    s = 1 / (1 + math.exp(-3.0))
    terms = [0.25 * 0.5**2 * math.log(2), 0.75 * s**2 * -math.log(1 - s)]
    assert losses.sigmoid_focal_loss(x, y).item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_kl_distillation_matches_torch_kl_div_with_temperature_squared() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    t = 3.0
    ref = F.kl_div(
        F.log_softmax(student / t, -1),
        F.log_softmax(teacher / t, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert losses.distillation_kl(student, teacher, temperature=t).item() == pytest.approx(
        t * t * ref.item(), rel=1e-5
    )
    # by hand for one two-class position: KL(p||q) = sum p log(p/q)
    p, q = [0.5, 0.5], [1 / (1 + math.e), math.e / (1 + math.e)]
    by_hand = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    got = losses.kl_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_symmetric_kl_is_symmetric_zero_on_equal_and_masks() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    assert losses.symmetric_kl(a, b).item() == pytest.approx(losses.symmetric_kl(b, a).item())
    assert losses.symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    masked = losses.symmetric_kl(a, b, mask=mask)
    assert masked.item() == pytest.approx(
        losses.symmetric_kl(a[:1, :1], b[:1, :1]).item(), rel=1e-6
    )


class _Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.emb(input_ids)).mean(1))


def test_rdrop_is_task_loss_without_dropout_and_adds_kl_with_it() -> None:
    torch.manual_seed(0)
    model = _Dropping()
    batch = {"input_ids": torch.randint(10, (4, 5)), "labels": torch.tensor([0, 1, 2, 0])}
    model.eval()
    plain = losses.cross_entropy(model(batch["input_ids"]), batch["labels"])
    assert losses.RDropLoss(alpha=5.0)(model, batch).item() == pytest.approx(plain.item(), rel=1e-6)
    model.train()
    torch.manual_seed(1)
    with_kl = losses.RDropLoss(alpha=5.0)(model, batch)
    torch.manual_seed(1)
    out = model(torch.cat([batch["input_ids"]] * 2))
    labels = torch.cat([batch["labels"]] * 2)
    expected = losses.cross_entropy(out, labels) + 5.0 * losses.symmetric_kl(*out.chunk(2))
    assert with_kl.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.symmetric_kl(*out.chunk(2)).item() > 0


def test_distillation_loss_mixes_task_and_teacher_terms() -> None:
    torch.manual_seed(0)
    student, teacher = TinyMLP().eval(), TinyMLP().eval()
    ids = torch.randint(20, (2, 3))
    labels = torch.tensor([[0, 1, -100], [2, -100, 4]])
    batch = {"input_ids": ids, "labels": labels}
    got = losses.DistillationLoss(teacher, temperature=2.0, alpha=0.3)(student, batch)
    s, t = student(ids), teacher(ids)
    kd = losses.distillation_kl(s, t, temperature=2.0, mask=labels != -100)
    assert got.item() == pytest.approx(
        (0.7 * losses.cross_entropy(s, labels) + 0.3 * kd).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="alpha"):
        losses.DistillationLoss(teacher, alpha=1.5)


def test_l2sp_by_hand_and_pulls_toward_the_start() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    apply_lora(model, r=2, targets=["fc1"])
    penalty = losses.L2SP(model, alpha=0.5)
    assert penalty(model).item() == 0.0
    lora_b = model.fc1.lora_B
    with torch.no_grad():
        lora_b.add_(0.1)
    assert penalty(model).item() == pytest.approx(0.5 / 2 * 0.01 * lora_b.numel(), rel=1e-5)
    penalty(model).backward()
    assert torch.allclose(lora_b.grad, torch.full_like(lora_b, 0.5 * 0.1))


def test_ewc_fisher_and_penalty_by_hand() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    batches = [
        (torch.tensor([[1.0]]), torch.tensor([[0.0]])),
        (torch.tensor([[3.0]]), torch.tensor([[0.0]])),
    ]

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (m(batch[0]) - batch[1]).pow(2).mean()

    ewc = losses.EWC.from_data(model, batches, loss_fn, lam=2.0)
    # d/dw (w x)^2 = 2 w x^2: 4 and 36 at w = 2 -> F = (16 + 1296) / 2
    assert ewc.fisher["weight"].item() == pytest.approx(656.0)
    with torch.no_grad():
        model.weight.fill_(2.5)
    assert ewc(model).item() == pytest.approx(0.5 * 2.0 * 656.0 * 0.25)


def test_fgm_perturbation_has_radius_epsilon_and_points_up_the_gradient() -> None:
    torch.manual_seed(0)
    model = CASES["bert"].build()
    apply_lora(model, r=2, targets=["query"])
    batch = {**CASES["bert"].inputs(), "labels": torch.tensor([0, 2])}
    attack = losses.EmbeddingAttack(losses.find_input_embedding(model), method="fgm", epsilon=0.5)

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**b).loss

    with attack.probe():
        clean = loss_fn(model, batch)
    clean.backward()
    grad = attack.delta.grad.clone()
    seen: list[torch.Tensor] = []
    hook = model.bert.embeddings.word_embeddings.register_forward_hook(
        lambda m, a, o: seen.append(o)
    )
    adv = attack.loss(model, batch, loss_fn)
    hook.remove()
    assert adv.item() > clean.item()  # ascent direction (eval mode: no dropout noise)
    with attack.probe():
        model(**batch)
    assert attack.delta.abs().sum() == 0  # outside attack.loss the embeddings are untouched
    attack.remove()
    with torch.no_grad():
        clean_embeddings = model.bert.embeddings.word_embeddings(batch["input_ids"])
    expected = 0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    assert torch.allclose(seen[0] - clean_embeddings, expected, atol=1e-6)


def test_pgd_stays_in_the_ball() -> None:
    delta = torch.randn(3, 4, 5)
    projected = losses.adversarial.project(delta * 10, 0.7)
    assert torch.allclose(projected.flatten(1).norm(dim=1), torch.full((3,), 0.7))
    small = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1) * 0.1
    assert torch.equal(losses.adversarial.project(small, 0.7), small)
