"""prune_: every method reaches its target exactly on a tiny model; SparseGPT's update beats
plain masking on real text; the report counts what was removed."""

import pytest
import torch
from helpers import random_tiny

from tuili.data import builtin_text, calibration_samples
from tuili.models.layerwise import Hessian, input_hooks
from tuili.prune import SemiStructured, SparseGPT, Unstructured, Wanda, masks_of, prune_, sparsegpt, sparsity_report
from tuili.prune.masks import unstructured_mask
from tuili.prune.methods import method_named


@pytest.fixture(scope="module")
def calib():
    model = random_tiny("llama-gqa")
    ids = model.tokenizer.encode(builtin_text("calibration")[:20000])
    return calibration_samples(ids, 8, 64, seed=0)


def decoder_linears(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}


@pytest.mark.parametrize("method", ["magnitude", "taylor", "wanda", "sparsegpt"])
def test_half_unstructured_is_exact_in_every_layer(method, calib):
    model = random_tiny("llama-gqa")
    head = model.module.lm_head.weight.clone()
    assert prune_(model, Unstructured(0.5), method_named(method), calib=calib, progress=False) is model
    masks = masks_of(model.module)
    assert set(masks) == set(decoder_linears(model.module))
    for name, m in decoder_linears(model.module).items():
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2, name
        assert torch.equal(masks[name], m.weight_mask)
    assert torch.equal(model.module.lm_head.weight, head)  # the head is left alone by default
    assert model.provenance[-1]["step"] == "pruned" and model.provenance[-1]["method"] == method


@pytest.mark.parametrize("method", ["magnitude", "taylor", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_pattern_with_every_method(method, n, m, calib):
    model = random_tiny("llama-gqa")
    prune_(model, SemiStructured(n, m), method_named(method), calib=calib, progress=False)
    for name, lin in decoder_linears(model.module).items():
        nonzero = (lin.weight != 0).reshape(lin.out_features, -1, m).sum(-1)
        assert (nonzero <= n).all() and (lin.weight_mask.reshape(lin.out_features, -1, m).sum(-1) == n).all(), name


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_global_scope_is_exact_over_all_layers(method, calib):
    model = random_tiny("llama-gqa")
    prune_(model, Unstructured(0.6, scope="global"), method_named(method), calib=calib, progress=False)
    report = sparsity_report(model.module)
    decoder = [layer for layer in report.layers if layer.name.startswith("model.layers")]
    total = sum(layer.params for layer in decoder)
    assert sum(layer.zeros for layer in decoder) == round(0.6 * total)
    assert len({round(layer.sparsity, 3) for layer in decoder}) > 1  # uneven across layers


def test_sparsegpt_update_lowers_the_output_error_below_masking(calib):
    model = random_tiny("llama-gqa")
    layer = model.module.model.layers[0].mlp.down_proj
    hessian, inputs = Hessian(layer.in_features), []

    def keep(_, x):
        hessian.add(x)
        inputs.append(x.detach().clone())

    with input_hooks({"down": layer}, keep):
        with torch.no_grad():
            model.module(calib)
    x = torch.cat(inputs)
    w = layer.weight.detach().float()
    dense = x @ w.T
    pruned, mask = sparsegpt(w, hessian.value(), Unstructured(0.5))
    assert int((~mask).sum()) == w.numel() // 2 and (pruned[~mask] == 0).all()
    masked_same = w * mask  # SparseGPT's own mask without its update
    magnitude = w * unstructured_mask(w.abs(), 0.5)
    error = (x @ pruned.T - dense).pow(2).mean()
    assert error < 0.8 * (x @ masked_same.T - dense).pow(2).mean()
    assert error < 0.8 * (x @ magnitude.T - dense).pow(2).mean()


def test_bad_requests_are_refused(calib):
    model = random_tiny("llama-gqa")
    with pytest.raises(ValueError, match="unknown pruning method"):
        method_named("random")
    with pytest.raises(TypeError, match="'random' is not a pruning method; use one of magnitude, taylor"):
        prune_(model, Unstructured(0.5), "random")
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(model, Unstructured(0.5), Wanda())
    with pytest.raises(ValueError, match="scope='layer'"):
        prune_(model, Unstructured(0.5, scope="global"), SparseGPT(), calib=calib)
    with pytest.raises(ValueError, match="damp must be in"):
        SparseGPT(damp=2)
    with pytest.raises(ValueError, match="outside them"):
        prune_(model, Unstructured(0.5), Wanda(), calib=calib, ignore=())
    with pytest.raises(ValueError, match="no linear layers"):
        prune_(model, Unstructured(0.5), targets=["nothing*"])


def test_report_counts_zeros_per_layer_and_in_all():
    model = random_tiny("llama-mqa-tied")
    prune_(model, Unstructured(0.25), progress=False)
    report = sparsity_report(model.module)
    names = [layer.name for layer in report.layers]
    assert "lm_head" not in names or names.count("lm_head") == 1  # tied: counted once
    data = report.to_dict()
    assert data["zeros"] == sum(layer["zeros"] for layer in data["layers"])
    q = next(layer for layer in report.layers if layer.name == "model.layers.0.self_attn.q_proj")
    assert q.sparsity == pytest.approx(0.25, abs=1 / q.params)


def test_a_sparse_model_saves_its_sparsity_and_loads_back_identically(tmp_path, calib):
    import json

    import transformers

    import tuili
    from tuili.prune import restore_masks

    model = random_tiny("llama-gqa")
    prune_(model, SemiStructured(2, 4), Wanda(), calib=calib, progress=False)
    model.save(tmp_path / "sparse")
    sparsity = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == 0.5 and "lm_head" in sparsity["ignore"]
    again = tuili.load(tmp_path / "sparse")
    ids = torch.randint(0, 259, (1, 16))
    with torch.no_grad():
        assert torch.equal(again.module(ids).logits, model.module(ids).logits)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")  # compressed-tensors' dense format
        torch.testing.assert_close(hf(ids).logits, model.module(ids).logits, atol=1e-4, rtol=1e-4)
    assert restore_masks(again) == len(sparsity["targets"])
    q = again.module.model.layers[0].self_attn.q_proj
    assert torch.equal(q.weight_mask, q.weight != 0)
