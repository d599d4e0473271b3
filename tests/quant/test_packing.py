"""One copy of a weight-only layer's weights: the N-major packing of the 16-bit dot-product kernels
replaces the row layout, which comes back in place of it wherever something reads it."""

import pytest
import torch
from helpers import random_tiny
from torch import nn

import tuili
from tuili.kernels import ops, repack
from tuili.pipeline.analysis import analyze
from tuili.quant import Int4WeightOnly, Int8Linear, Int8WeightOnly, WeightOnlyLinear, quantize_
from tuili.quant.linear import QuantizedEmbedding

pytestmark = pytest.mark.skipif(
    ops.extension() is None or not repack.bf16_dot_products(), reason="the N-major packing needs AVX512-BF16 kernels"
)


def held_bytes(module: nn.Module) -> int:
    """Bytes of the storages a module's layers really hold: buffers and parameters that are not meta
    placeholders, and their kernels' packings."""
    storages = {}
    for m in module.modules():
        tensors = [t for t in (*m._buffers.values(), *m._parameters.values()) if t is not None and not t.is_meta]
        packing = m.__dict__.get("_packed")
        tensors += [t for t in packing.tensors if t is not None] if packing is not None else []
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    "bits, group_size, symmetric",
    [(4, 32, True), (4, 128, False), (4, 64, True), (8, 32, True), (8, 20, True), (8, "channel", True)],
)
def test_a_layer_run_on_bf16_activations_holds_its_weights_once(bits, group_size, symmetric):
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(nn.Linear(200, 96, bias=True), bits, group_size, symmetric)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    rows = sum(t.numel() * t.element_size() for t in state.values())
    small, prefill = torch.randn(3, 200).bfloat16(), torch.randn(80, 200).bfloat16()
    want_prefill, want_fp32 = q(prefill), q(small.float())
    want_small = q(small)  # the first bf16 call packs the layer
    assert q._buffers["qweight"].is_meta and q._buffers["scale"].is_meta
    packing = q.__dict__["_packed"]
    assert held_bytes(q) <= 1.25 * rows  # scales and scale · zero kept per block of 16 outputs
    assert torch.equal(q(prefill), want_prefill)  # the prefill weight made from the packing
    assert q.__dict__.get("_packed") is packing  # not unpacked (and packed again) for it
    assert torch.equal(q(small), want_small)
    assert torch.equal(q.dequantize_rows(torch.tensor([5, 0])), q.dequantize()[[5, 0]])
    assert q.__dict__.get("_packed") is packing  # none of these unpacked it
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())  # the row layout, back
    assert not q._buffers["qweight"].is_meta and "_packed" not in q.__dict__
    assert torch.equal(q(small.float()), want_fp32)
    q(small)
    assert q._buffers["qweight"].is_meta  # packed again
    assert torch.equal(q(small.float()), want_fp32)  # the fp32 GEMV's row layout back, or from the packing


@pytest.mark.parametrize("static", [False, True])
def test_a_w8a8_layer_holds_its_weights_once_in_its_packing(static):
    torch.manual_seed(0)
    x = torch.randn(80, 200)
    q = Int8Linear.from_float(nn.Linear(200, 96, bias=True), x.abs().max() / 127 if static else None)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with ops.fallback():
        want = q(x)
    assert torch.equal(q(x[:3]), want[:3])  # the first kernel call packs the layer
    assert q._buffers["qweight"].is_meta and held_bytes(q) <= 1.1 * sum(t.nbytes for t in state.values())
    packing = q.__dict__["_packed"]
    assert torch.equal(q(x), want)  # every batch: AMX tiles, else torch._int_mm on a workspace unpacking
    assert torch.equal(q._reference(x) + q.bias, want)
    assert torch.equal(q.dequantize(), state["qweight"].float() * state["weight_scale"][:, None])
    assert q.__dict__.get("_packed") is packing  # none of these unpacked it
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())  # the row layout, back
    assert not q._buffers["qweight"].is_meta and "_packed" not in q.__dict__
    assert torch.equal(q(x), want) and q._buffers["qweight"].is_meta  # packed again


def test_gguf_codes_with_offsets_pack_and_come_back_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=g)
    scale, offset = torch.rand(48, 2, generator=g), torch.rand(48, 2, generator=g)
    q = WeightOnlyLinear.from_codes(codes, scale, offset, 4, 32)
    weight = q.dequantize()
    x = torch.randn(2, 64).bfloat16()
    want = q(x)
    q(x)
    assert q._buffers["offset"].is_meta
    assert torch.equal(q.dequantize(), weight) and torch.equal(q(x), want)
    assert torch.equal(q.offset, offset) and torch.equal(q.codes(), codes)


def test_a_served_model_holds_its_weights_once_and_saves_what_it_was(tmp_path):
    model = random_tiny("llama-gqa")
    quantize_(model, Int8WeightOnly(group_size=32), targets=["*.mlp.down_proj"], progress=False)
    quantize_(model, Int4WeightOnly(group_size=32, symmetric=True), progress=False)
    before = analyze(model).num_bytes
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    params = tuili.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = tuili.LLM(model, bf16_activations=True)
    packed = [m for m in model.module.modules() if "_packed" in m.__dict__]
    assert len(packed) == 7 * model.config.num_hidden_layers  # packed as the engine starts
    packings = [m.__dict__["_packed"] for m in packed]
    prompt = list(range(3, 140))  # a prefill above the dot-product kernels' 64 rows
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert all(m.__dict__.get("_packed") is p for m, p in zip(packed, packings))  # never unpacked
    assert analyze(model).num_bytes == before
    assert held_bytes(model.module) <= 1.15 * before
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == tokens
    saved = tuili.load(model.save(tmp_path / "q"))
    assert saved.module.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in saved.module.state_dict().items())


def test_a_head_packed_for_decoding_still_serves_the_embedding_lookups():
    torch.manual_seed(0)
    head = WeightOnlyLinear.from_float(nn.Linear(64, 300, bias=False), 4, 32, True)
    embed = QuantizedEmbedding(head)
    ids = torch.tensor([[3, 299, 17]])
    want = embed(ids)
    head(torch.randn(1, 64).bfloat16())
    assert head._buffers["qweight"].is_meta
    assert torch.equal(embed(ids), want) and head._buffers["qweight"].is_meta
