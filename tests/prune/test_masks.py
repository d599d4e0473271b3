"""Masks keep exactly what was asked, hold their N:M pattern, and survive training."""

import pytest
import torch
from torch import nn

from tuili.prune import SemiStructured, Unstructured, attach_mask, keep_masks
from tuili.prune.masks import global_masks, keep_top, nm_mask, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.999])
def test_unstructured_sparsity_is_exact_even_with_ties(sparsity):
    scores = torch.ones(64, 96)  # all tied: a threshold would keep all or nothing
    scores[::2] = 2.0
    mask = unstructured_mask(scores, sparsity)
    assert int((~mask).sum()) == round(sparsity * scores.numel())
    per_row = unstructured_mask(scores, sparsity, per_row=True)
    assert ((~per_row).sum(1) == round(sparsity * 96)).all()


def test_the_highest_scores_are_kept():
    scores = torch.randn(32, 32)
    mask = unstructured_mask(scores, 0.25)
    assert scores[mask].min() >= scores[~mask].max()


def test_global_sparsity_is_exact_and_uneven_across_layers():
    scores = {"a": torch.rand(50, 40), "b": torch.rand(30, 40) + 0.5}  # b matters more
    masks = global_masks(scores, 0.5)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(0.5 * (50 * 40 + 30 * 40))
    assert (~masks["a"]).float().mean() > (~masks["b"]).float().mean()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_holds_in_every_group(n, m):
    scores = torch.randn(24, 64)
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(24, -1, m).sum(-1) == n).all()
    kept = torch.where(mask, scores, torch.tensor(float("-inf"))).reshape(24, -1, m)
    # the kept are each group's largest: the smallest kept is at least the largest dropped
    largest_dropped = torch.where(~mask, scores, torch.tensor(float("-inf"))).reshape(24, -1, m).max(-1).values
    assert (kept.topk(n, -1).values.min(-1).values >= largest_dropped).all()


def test_nm_needs_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.randn(4, 10), 2, 4)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Unstructured(bad)


@pytest.mark.parametrize("n, m", [(5, 4), (4, 4), (0, 4)])
def test_n_not_below_m_is_refused(n, m):
    with pytest.raises(ValueError, match="0 < N < M"):
        SemiStructured(n, m)
    with pytest.raises(ValueError):
        SemiStructured.parse(f"{n}:{m}")


def test_parse_pattern():
    assert SemiStructured.parse("2:4") == SemiStructured(2, 4)
    with pytest.raises(ValueError, match="N:M"):
        SemiStructured.parse("half")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adamw"],
)
def test_pruned_weights_stay_zero_through_fine_tuning(make):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    mask = keep_top(net[0].weight.abs(), 16 * 32 // 2)
    attach_mask(net[0], mask)
    opt = make(net.parameters())
    keep_masks(opt, net)
    for _ in range(20):
        opt.zero_grad()
        net(torch.randn(8, 16)).pow(2).mean().backward()
        assert (net[0].weight.grad[~mask] == 0).all()
        opt.step()
    assert (net[0].weight[~mask] == 0).all() and (net[0].weight[mask] != 0).all()
    with torch.no_grad():  # even a manual edit is undone at the next optimizer step
        net[0].weight.fill_(1.0)
    opt.zero_grad()
    net(torch.randn(8, 16)).sum().backward()
    opt.step()
    assert (net[0].weight[~mask] == 0).all()


def test_a_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        attach_mask(nn.Linear(4, 4), torch.ones(4, 5, dtype=torch.bool))
