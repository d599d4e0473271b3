"""Every model family through every verb, on a tiny random model of that family: quantize with each
method, prune each way, distill, save and load, serve, and export. Logits against transformers are
checked in test_llama.py; the C++ decode step against the module forward in tests/engine."""

import httpx
import pytest
import torch
from helpers import random_tiny
from live import MODEL, live_server

import tuili
from tuili.distill import DistillConfig
from tuili.engine import LLM, SamplingParams
from tuili.pipeline.export import ExportError, check_onnx, export_onnx, sample_ids
from tuili.pipeline.gguf_export import check_gguf, export_gguf
from tuili.prune import SemiStructured, SparseGPT, Wanda, prune_
from tuili.prune.structured import prune_experts_, prune_heads_, prune_mlp_
from tuili.quant import (
    AWQ,
    GPTQ,
    RTN,
    Int4WeightOnly,
    Int8DynamicActivation,
    SmoothQuant,
    quantize_,
)

FAMILIES = [
    "llama-gqa",
    "mistral-sliding",
    "qwen2",
    "qwen3",
    "phi3-longrope",
    "phi4-mini",
    "gemma2",
    "gemma3",
    "qwen3-moe",
    "mixtral",
]
# What llama.cpp's graphs fix and these tiny configs vary: Gemma's query scale (head_dim^-1/2 below
# 46 / 62 layers) and Qwen3-MoE's dense layers. The export refuses the configs, and takes these.
GGUF_VARIANT = {
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16),
    "qwen3-moe": dict(mlp_only_layers=[], moe_intermediate_size=64),  # in blocks of 32, as the real ones
}
GGUF_REFUSAL = {"gemma2": "query_pre_attn_scalar", "gemma3": "query_pre_attn_scalar", "qwen3-moe": "dense MLPs"}
CALIB = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(1))
PROMPT = [5, 70, 80, 90, 100]


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.module(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def engine_matches_recomputation(model):
    # fp32 products, as the recomputation's: bf16 activations (tests/engine) flip near-ties of a tiny
    # random model's logits (phi4-mini after AWQ: 7e-4 apart at the 11th token)
    got = LLM(model, bf16_activations=False).generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )[0]
    assert got.outputs[0].token_ids == greedy_by_recomputation(model, PROMPT, 12)


def round_trips(model, folder):
    model.save(folder)
    again = tuili.load(folder)
    with torch.no_grad():  # Gemma stores its norms as w = (1 + w) − 1: within an ulp of 1
        torch.testing.assert_close(again.module(IDS).logits, model.module(IDS).logits, atol=1e-5, rtol=0)
    return again


@pytest.mark.parametrize(
    "scheme, method",
    [
        (Int4WeightOnly(group_size=32, symmetric=True), RTN()),
        (Int4WeightOnly(group_size=32, symmetric=True), GPTQ()),
        (Int4WeightOnly(group_size=32, symmetric=True), AWQ(grid=4)),
        (Int8DynamicActivation(), SmoothQuant()),
    ],
    ids=["rtn", "gptq", "awq", "smoothquant"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize(tmp_path, family, scheme, method):
    model = random_tiny(family)
    with torch.no_grad():
        before = model.module(IDS).logits
    quantize_(model, scheme, method, calib=CALIB, progress=False)
    with torch.no_grad():
        after = model.module(IDS).logits
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.9
    engine_matches_recomputation(round_trips(model, tmp_path / "q"))


@pytest.mark.parametrize("how", ["wanda", "sparsegpt-2:4", "heads-and-neurons"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prune(tmp_path, family, how):
    model = random_tiny(family)
    if how == "wanda":
        prune_(model, 0.5, Wanda(), calib=CALIB)
    elif how == "sparsegpt-2:4":
        prune_(model, SemiStructured(2, 4), SparseGPT(), calib=CALIB)
    elif model.config.num_experts:  # a mixture: heads, and whole experts (the least routed to)
        prune_heads_(model, 0.5, "l2", CALIB)
        prune_experts_(model, 0.5, "frequency", CALIB)
        assert model.config.num_attention_heads == 2 and model.config.num_experts == 2
    else:
        prune_heads_(model, 0.5, "l2", CALIB)
        prune_mlp_(model, 0.25, "l2", CALIB)
        assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 72
    engine_matches_recomputation(round_trips(model, tmp_path / "p"))


@pytest.mark.parametrize("family", FAMILIES)
def test_distill(family):
    teacher, student = random_tiny(family, seed=0), random_tiny(family, seed=1)
    before = [p.detach().clone() for p in student.module.parameters()]
    train = torch.randint(3, 259, (8, 24), generator=torch.Generator().manual_seed(2))
    config = DistillConfig(steps=2, batch_size=4, warmup_steps=0, lr=1e-3, eval_every=100, bf16=False)
    tuili.distill_(student, config, teacher=teacher, train=train, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.module.parameters()))
    assert student.provenance[-1]["step"] == "distilled"


@pytest.mark.parametrize("family", FAMILIES)
def test_serve(family):
    model = random_tiny(family)
    with live_server(model) as (base, _):
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_export(tmp_path, family):
    model = quantize_(random_tiny(family), Int4WeightOnly(group_size=32, symmetric=True), progress=False)
    onnx = export_onnx(model, tmp_path / "m.onnx")
    assert check_onnx(onnx.path, model, sample_ids(model)) < 1e-3
    if family in GGUF_REFUSAL:
        with pytest.raises(ExportError, match=GGUF_REFUSAL[family]):
            export_gguf(model, tmp_path / "m.gguf", "f32")
        assert not (tmp_path / "m.gguf").exists()
        model = random_tiny(family, **GGUF_VARIANT[family])
        model = quantize_(model, Int4WeightOnly(group_size=32, symmetric=True), progress=False)
    gguf = export_gguf(model, tmp_path / "m.gguf", "f32")
    assert gguf.tensor_types["Q4_0"] and not gguf.dequantized
    assert check_gguf(gguf.path, model, IDS) < 2e-3
    served = tuili.load(gguf.path, keep_quantized=True)  # the codes as they are, fused and experts split
    with torch.no_grad():
        assert (served.module(IDS).logits - model.module(IDS).logits).abs().max() < 2e-3
