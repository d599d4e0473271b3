"""Quantization on the real default model: the algorithms beat round-to-nearest on real
calibration activations, and quantized folders load in tuili and transformers."""

import copy

import pytest
import torch

import tuili
from tuili.data import builtin_text, calibration_samples, eval_windows, perplexity
from tuili.engine import SamplingParams, generate
from tuili.models.layerwise import Hessian, input_hooks
from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, SmoothQuant, quantize_
from tuili.quant.awq import fake_quantize_weight, search_scale
from tuili.quant.gptq import gptq
from tuili.quant.smooth import smooth_groups

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calib(default_model):
    return calibration_samples(default_model.tokenizer.encode(builtin_text("calibration")), 8, 256, seed=0)


@pytest.fixture(scope="module")
def mlp_inputs(default_model, calib):
    """What layer 5's gate/up projections receive on the calibration split: (tokens, 576)."""
    layer = default_model.module.model.layers[5]
    seen = []
    with torch.no_grad(), input_hooks({"gate": layer.mlp.gate_proj}, lambda name, x: seen.append(x.clone())):
        default_model.module(calib)
    return torch.cat(seen)


def output_error(w, w_hat, x):
    return (x @ (w - w_hat).T).pow(2).mean().item()


def test_gptq_lowers_the_layer_output_error_below_rtn(default_model, mlp_inputs):
    w = default_model.module.model.layers[5].mlp.gate_proj.weight.detach()
    h = Hessian(576)
    h.add(mlp_inputs)
    rtn = fake_quantize_weight(w, 4, 64, symmetric=False)
    for act_order in (False, True):
        q = gptq(w, h.value(), 4, 64, symmetric=False, act_order=act_order).dequantize()
        assert output_error(w, q, mlp_inputs) < 0.9 * output_error(w, rtn, mlp_inputs)


def test_awq_scales_lower_the_group_output_error_below_rtn(default_model, mlp_inputs):
    layer = copy.deepcopy(default_model.module.model.layers[5])
    group = next(g for g in smooth_groups(layer) if "mlp.gate_proj" in g.linears)
    s = search_scale(group, mlp_inputs, 4, 64, symmetric=False, grid=20)
    rtn = sum(
        output_error(m.weight, fake_quantize_weight(m.weight, 4, 64, False), mlp_inputs) for m in group.linears.values()
    )
    awq = sum(
        output_error(m.weight, fake_quantize_weight(m.weight * s, 4, 64, False) / s, mlp_inputs)
        for m in group.linears.values()
    )
    assert awq < rtn


def test_transformers_loads_a_w4a16_default_model(default_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = copy.deepcopy(default_model)
    quantize_(model, Int4WeightOnly(group_size=64, symmetric=True))  # asymmetric: see docs/quantization.md
    model.save(tmp_path / "w4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4", dtype=torch.float32)
    ids = torch.tensor([model.tokenizer.encode(builtin_text()[:1500])[:128]])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model.module(ids).logits - expected).abs().max() < 1e-3
    again = tuili.load(tmp_path / "w4")
    assert torch.equal(again.module(ids).logits, model.module(ids).logits)


def test_w8a16_keeps_perplexity_and_answers(default_model):
    windows = eval_windows(default_model.tokenizer.encode(builtin_text("evaluation")), 512, max_tokens=2048)
    fp32 = perplexity(default_model.module, windows, progress=False).perplexity
    model = copy.deepcopy(default_model)
    quantize_(model, Int8WeightOnly(), ignore=[])
    assert perplexity(model.module, windows, progress=False).perplexity < fp32 * 1.01
    done = generate(
        model,
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=24, temperature=0),
    )
    assert "Paris" in done.text


def test_smoothquant_improves_w8a8_dynamic(default_model, calib):
    windows = eval_windows(default_model.tokenizer.encode(builtin_text("evaluation")), 512, max_tokens=2048)
    plain, smooth = copy.deepcopy(default_model), copy.deepcopy(default_model)
    quantize_(plain, Int8DynamicActivation())
    quantize_(smooth, Int8DynamicActivation(), SmoothQuant(), calib=calib, progress=False)
    fp32 = perplexity(default_model.module, windows, progress=False).perplexity
    ppl_plain = perplexity(plain.module, windows, progress=False).perplexity
    ppl_smooth = perplexity(smooth.module, windows, progress=False).perplexity
    assert ppl_smooth < ppl_plain and ppl_smooth < fp32 * 1.03
