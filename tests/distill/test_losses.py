"""The distillation losses, against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from tuili.distill import (
    TopKLogits,
    attention_loss,
    distillation_loss,
    hard_loss,
    hidden_loss,
    soft_loss,
)


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_soft_loss_is_the_kl_at_temperature_t_scaled_by_t_squared():
    student, teacher = [1.0, 0.0, -1.0], [2.0, 0.5, 0.0]
    for t in (1.0, 2.0, 4.0):
        expected = _kl(_softmax(teacher, t), _softmax(student, t)) * t * t
        got = soft_loss(torch.tensor([[student]]), torch.tensor([[teacher]]), temperature=t)
        assert got.item() == pytest.approx(expected, rel=1e-4)  # fp32 arithmetic


def test_soft_loss_is_a_mean_over_positions_and_zero_when_the_student_matches():
    s = torch.randn(2, 5, 11)
    per_position = [
        soft_loss(s[b : b + 1, i : i + 1], s[b : b + 1, i : i + 1] * 2, 2.0) for b in range(2) for i in range(5)
    ]
    assert soft_loss(s, s * 2, 2.0).item() == pytest.approx(torch.stack(per_position).mean().item(), rel=1e-5)
    assert soft_loss(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_positions_change_nothing():
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[~mask], garbage_t[~mask] = 1e4, -1e4
    assert soft_loss(garbage_s, garbage_t, 2.0, mask).item() == pytest.approx(soft_loss(s, t, 2.0, mask).item())
    kept = torch.cat(
        [soft_loss(s[0:1, :4], t[0:1, :4], 2.0)[None] * 4, soft_loss(s[1:2, :2], t[1:2, :2], 2.0)[None] * 2]
    )
    assert soft_loss(s, t, 2.0, mask).item() == pytest.approx(kept.sum().item() / 6, rel=1e-5)
    with pytest.raises(ValueError, match="no position"):
        soft_loss(s, t, 2.0, torch.zeros(2, 6, dtype=torch.bool))


def test_hard_loss_is_cross_entropy_skipping_ignored_labels():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, -100]])
    expected = (-math.log(_softmax([2, 0, 0])[0]) - math.log(_softmax([0, 1, 0])[2])) / 2
    assert hard_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert hard_loss(logits, labels, torch.tensor([[True, False, True]])).item() == pytest.approx(
        -math.log(_softmax([2, 0, 0])[0]), rel=1e-6
    )


def test_total_is_alpha_soft_plus_one_minus_alpha_hard():
    s, t, labels = torch.randn(1, 4, 7), torch.randn(1, 4, 7), torch.randint(0, 7, (1, 4))
    out = distillation_loss(s, t, labels, temperature=3.0, alpha=0.3)
    assert out.soft.item() == pytest.approx(soft_loss(s, t, 3.0).item())
    assert out.hard.item() == pytest.approx(F.cross_entropy(s[0], labels[0]).item(), rel=1e-6)
    assert out.total.item() == pytest.approx(0.3 * out.soft.item() + 0.7 * out.hard.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, labels, alpha=1.5)
    with pytest.raises(ValueError, match="one vocabulary"):
        soft_loss(s, torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="temperature"):
        soft_loss(s, t, temperature=0)


def test_top_k_teacher_logits_are_exact_at_full_k_and_a_lower_bound_below():
    s, t = torch.randn(2, 3, 50), torch.randn(2, 3, 50) * 3
    full = soft_loss(s, t, 2.0)
    assert soft_loss(s, TopKLogits.of(t, 50, 2.0), 2.0).item() == pytest.approx(full.item(), rel=1e-5)
    top = soft_loss(s, TopKLogits.of(t, 8, 2.0), 2.0).item()
    assert 0 < top <= full.item() + 1e-6
    # the gradient of the sparse loss still pulls the student toward the teacher's top tokens
    s.requires_grad_()
    soft_loss(s, TopKLogits.of(t, 8, 2.0), 2.0).backward()
    top_ids = t.topk(1, dim=-1).indices
    assert (s.grad.gather(-1, top_ids) <= 0).all()


def test_attention_losses_by_hand():
    a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (B=1, H=1, T=2, S=2)
    b = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    assert attention_loss(a, b, "mse").item() == pytest.approx((0 + 2 * 0.25**2) / 2)
    kl_row2 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert attention_loss(a, b, "kl").item() == pytest.approx(kl_row2 / 2, rel=1e-5)
    cos_row2 = (0.5 * 0.25 + 0.5 * 0.75) / (math.sqrt(0.5) * math.sqrt(0.25**2 + 0.75**2))
    assert attention_loss(a, b, "cosine").item() == pytest.approx((1 - cos_row2) / 2, rel=1e-5)
    assert attention_loss(a, b, "mse", mask=torch.tensor([[True, False]])).item() == 0.0
    with pytest.raises(ValueError, match="mse, kl, cosine"):
        attention_loss(a, b, "l1")


def test_attention_heads_are_mapped_grouped_or_averaged():
    teacher = torch.softmax(torch.randn(1, 4, 3, 3), -1)
    student = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    grouped = teacher.view(1, 2, 2, 3, 3).mean(2)
    assert attention_loss(student, teacher, "mse").item() == pytest.approx(attention_loss(student, grouped).item())
    assert attention_loss(student, teacher, "mse", head_map=[3, 0]).item() == pytest.approx(
        attention_loss(student, teacher[:, [3, 0]]).item()
    )
    three = torch.softmax(torch.randn(1, 3, 3, 3), -1)
    assert attention_loss(three, teacher, "kl").item() == pytest.approx(
        attention_loss(three.mean(1, keepdim=True), teacher.mean(1, keepdim=True), "kl").item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="head map"):
        attention_loss(student, teacher, head_map=[0, 4])
    with pytest.raises(ValueError, match="different tokens"):
        attention_loss(student, torch.softmax(torch.randn(1, 4, 3, 5), -1))


def test_hidden_losses_by_hand():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    assert hidden_loss(a, b, "mse").item() == pytest.approx(((1 + 1) / 2 + (1 + 1) / 2) / 2)
    assert hidden_loss(a, b, "cosine").item() == pytest.approx((1 - 0) / 2, abs=1e-6)
    assert hidden_loss(a, b, "cosine", mask=torch.tensor([[False, True]])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(a, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="mse, cosine"):
        hidden_loss(a, b, "kl")


def test_the_chunked_soft_loss_has_autograds_value_and_gradient():
    s = torch.randn(3, 200, 37, dtype=torch.float64).float().requires_grad_()
    t = torch.randn(3, 200, 37)
    mask = torch.rand(3, 200) > 0.3
    soft_loss(s, t, 2.5, mask).backward()
    reference = s.detach().clone().requires_grad_()
    sl, tl = F.log_softmax(reference / 2.5, -1), F.log_softmax(t / 2.5, -1)
    expected = ((tl.exp() * (tl - sl)).sum(-1)[mask].mean()) * 2.5**2
    expected.backward()
    assert soft_loss(s, t, 2.5, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(s.grad, reference.grad, rtol=1e-4, atol=1e-7)
