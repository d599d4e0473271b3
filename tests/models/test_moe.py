"""Mixtures of experts: routing as transformers computes it (test_llama.py), experts that no
calibration token reaches, and whole experts removed."""

import pytest
import torch
from helpers import random_tiny

from tuili.models.llama import SparseMoE
from tuili.prune import Wanda, prune_
from tuili.prune.masks import masks_of
from tuili.prune.structured import expert_scores, prune_experts_
from tuili.quant import GPTQ, Int4WeightOnly, quantize_
from tuili.quant.linear import WeightOnlyLinear

CALIB = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def never_expert_3(monkeypatch):
    """Routers of 4 experts never choose expert 3 (as a rarely used expert on a small calibration set)."""
    choose = SparseMoE.choose

    def without_3(self, logits):
        if logits.shape[-1] == 4:
            logits = logits.clone()
            logits[:, 3] = float("-inf")
        return choose(self, logits)

    monkeypatch.setattr(SparseMoE, "choose", without_3)


def test_an_expert_no_calibration_token_reaches_is_rounded_to_nearest(never_expert_3):
    model, twin = random_tiny("mixtral"), random_tiny("mixtral")
    scheme = Int4WeightOnly(group_size=32, symmetric=True)
    quantize_(model, scheme, GPTQ(), calib=CALIB, progress=False)
    for layer, original in zip(model.module.model.layers, twin.module.model.layers):
        unreached = layer.mlp.experts[3].up_proj
        assert isinstance(unreached, WeightOnlyLinear)  # not zeroed by GPTQ's dead-input rule: RTN
        rtn = WeightOnlyLinear.from_float(original.mlp.experts[3].up_proj, 4, 32, True)
        assert torch.equal(unreached.qweight, rtn.qweight) and unreached.dequantize().abs().sum() > 0
        reached = WeightOnlyLinear.from_float(original.mlp.experts[0].up_proj, 4, 32, True)
        assert not torch.equal(layer.mlp.experts[0].up_proj.qweight, reached.qweight)  # GPTQ's own rounding


def test_wanda_prunes_an_unreached_expert_by_magnitude(never_expert_3):
    model, twin = random_tiny("mixtral"), random_tiny("mixtral")
    prune_(model, 0.5, Wanda(), calib=CALIB, progress=False)
    masks = masks_of(model.module)
    kept = masks["model.layers.0.mlp.experts.3.down_proj"]
    w = twin.module.model.layers[0].mlp.experts[3].down_proj.weight.detach().abs()
    assert (
        kept.float().mean() == 0.5 and (model.module.model.layers[0].mlp.experts[3].down_proj.weight[~kept] == 0).all()
    )
    for row, keep in zip(w, kept):  # each row kept its largest half by |w|
        assert row[keep].min() >= row[~keep].max()
    assert "model.layers.0.mlp.gate" not in masks  # the router is left alone by default


def test_removing_an_expert_no_token_chooses_changes_nothing(never_expert_3):
    model = random_tiny("mixtral")  # Mixtral renormalizes the chosen experts' weights
    with torch.no_grad():
        before = model.module(IDS).logits
    scores = expert_scores(model, "frequency", CALIB)
    assert all(s[3] == 0 and (s[:3] > 0).all() for s in scores.values())
    assert prune_experts_(model, 0.25, "frequency", CALIB) == 3
    with torch.no_grad():
        torch.testing.assert_close(model.module(IDS).logits, before, atol=1e-5, rtol=0)
    assert model.config.num_experts == 3 and model.module.model.layers[0].mlp.gate.out_features == 3


def test_too_few_experts_left_is_refused():
    model = random_tiny("qwen3-moe")
    with pytest.raises(ValueError, match="fewer than the 2 each token is routed to"):
        prune_experts_(model, 0.75, "l2")
    with pytest.raises(ValueError, match="not MLP neurons"):
        from tuili.prune.structured import prune_mlp_

        prune_mlp_(model, 0.25, "l2")
