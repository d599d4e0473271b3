"""Structured pruning shrinks the model and computes exactly what the masked dense model computes;
the smaller model saves, loads, and runs in the engine."""

import pytest
import torch
from helpers import random_tiny

import tuili
from tuili.engine import LLM, SamplingParams
from tuili.prune.structured import drop_layers_, head_scores, neuron_scores, prune_heads_, prune_mlp_

IDS = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(3))
CALIB = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model.module(IDS).logits


@pytest.mark.parametrize("importance", ["l1", "l2", "activation", "taylor"])
def test_removing_neurons_equals_masking_them(importance):
    model, dense = random_tiny("llama-gqa"), random_tiny("llama-gqa")
    scores = neuron_scores(model, importance, CALIB)
    size = prune_mlp_(model, 0.25, importance, CALIB)
    assert size == 96 - 24 and model.config.intermediate_size == size
    for layer, s in zip(dense.module.model.layers, scores):  # zero the same neurons' output columns
        dropped = torch.topk(-s, 24).indices
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, dropped] = 0
    torch.testing.assert_close(logits(model), logits(dense), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.module.parameters()) < sum(p.numel() for p in dense.module.parameters())


@pytest.mark.parametrize("whole_groups", [False, True])
@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_removing_heads_equals_masking_them_and_keeps_gqa_valid(whole_groups, importance):
    model, dense = random_tiny("llama-mha-untied-bias"), random_tiny("llama-mha-untied-bias")  # 4 heads, 4 KV
    if not whole_groups:  # 4 query heads in 2 groups of 2: take a GQA model
        model, dense = random_tiny("llama-gqa"), random_tiny("llama-gqa")
    scores = head_scores(model, importance, CALIB)
    heads, kv = prune_heads_(model, 0.5, importance, CALIB, whole_groups=whole_groups)
    assert (heads, kv) == ((2, 2) if whole_groups else (2, 2))
    d = model.config.head_dim
    group = dense.config.num_attention_heads // dense.config.num_key_value_heads
    for layer, s in zip(dense.module.model.layers, scores):
        per_group = s.reshape(-1, group)
        if whole_groups:
            dropped_groups = torch.topk(-per_group.sum(1), per_group.shape[0] - kv).indices
            dropped = (dropped_groups[:, None] * group + torch.arange(group)).reshape(-1)
        else:
            low = torch.topk(-per_group, group - heads // kv, dim=1).indices
            dropped = (torch.arange(per_group.shape[0])[:, None] * group + low).reshape(-1)
        with torch.no_grad():
            for h in dropped.tolist():
                layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(logits(model), logits(dense), atol=1e-5, rtol=1e-5)


def test_dropped_layers_are_the_least_influential_and_the_rest_still_compute():
    model, dense = random_tiny("llama-gqa"), random_tiny("llama-gqa")
    with torch.no_grad():  # make layer 1 nearly an identity: it should go first
        for p in model.module.model.layers[1].parameters():
            if p.dim() == 2:
                p.mul_(1e-3)
    dropped = drop_layers_(model, 1, CALIB)
    assert dropped == [1] and model.config.num_hidden_layers == 1
    assert model.module.model.layers[0].self_attn.layer_idx == 0
    del dense.module.model.layers[1]
    torch.testing.assert_close(logits(model), logits(dense), atol=1e-5, rtol=1e-5)


def test_a_pruned_model_saves_loads_and_runs_in_the_engine(tmp_path):
    model = random_tiny("llama-gqa")
    prune_mlp_(model, 0.25, "l2")
    prune_heads_(model, 0.5, "l2")
    model.save(tmp_path / "small")
    again = tuili.load(tmp_path / "small")
    assert again.config.intermediate_size == 72 and again.config.num_attention_heads == 2
    assert torch.equal(logits(model), logits(again))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = LLM(again).generate([[5, 6, 7]], greedy)[0]
    seq = [5, 6, 7]
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(again.module(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.token_ids == seq[3:]


def test_bad_requests_are_refused():
    model = random_tiny("llama-gqa")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_mlp_(model, 1.0, "l2")
    with pytest.raises(ValueError, match="leaves none"):
        prune_heads_(model, 0.99, "l2", whole_groups=True)
    with pytest.raises(ValueError, match="rounds to no head"):
        prune_heads_(model, 0.1, "l2")
    with pytest.raises(ValueError, match="calibration"):
        prune_mlp_(model, 0.25, "activation")
    with pytest.raises(ValueError, match="unknown neuron importance"):
        prune_mlp_(model, 0.25, "random")
    with pytest.raises(ValueError, match="layers to remove"):
        drop_layers_(model, 2, CALIB)


def test_iterative_pruning_rises_in_stages_and_recovery_keeps_the_masks():
    from tuili.prune import Magnitude, Unstructured
    from tuili.prune.iterative import iterative_prune_

    model = random_tiny("llama-gqa")
    stages = iterative_prune_(
        model, Unstructured(0.6), Magnitude(), 3, train=CALIB, steps=3, lr=1e-3, eval_windows=CALIB[:2], progress=False
    )
    assert [round(s.sparsity, 3) for s in stages] == [0.2, 0.4, 0.6]
    assert all(s.perplexity is not None and s.loss is not None for s in stages)
    q = model.module.model.layers[0].self_attn.q_proj
    assert int((q.weight == 0).sum()) == round(0.6 * q.weight.numel())
