"""W4A8 on the N-major packing (csrc/w4a8.cpp, `w4a8_linear_nmajor`): the kernel against the row
layout's twin, the packing's own twin, and a W4A8 layer that holds only the packing on AVX2."""

import pytest
import torch
from torch import nn

from tests.kernels.test_ops import needs_kernels, random_w4
from tuili.kernels import ops, repack
from tuili.kernels.build import extension

ext = extension()
SHAPES = [(96, 576, 64), (576, 1536, 128), (7, 576, 128), (33, 100, 32), (5, 577, 64), (40, 96, 32), (3, 300, 256)]


def packed_w4(n, k, group_size, symmetric, seed=0):
    """Row-layout W4 (symmetric: flipped codes, zs = 8 · scale) and its N-major packing."""
    w, scale, zs = random_w4(n, k, group_size, symmetric, seed)
    if symmetric:
        zs = 8 * scale
    return (w, scale, zs), repack.pack_w4_bf16(w, k, symmetric, scale, zs)


@pytest.mark.parametrize("n, k, group_size", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_the_nmajor_twin_is_the_row_layouts_twin(n, k, group_size, symmetric):
    rows, packed = packed_w4(n, k, group_size, symmetric)
    x = torch.randn(3, k)
    expected = ops.w4a8_linear_reference(x, *rows, group_size, symmetric)
    got = repack.w4a8_linear_nmajor_reference(x, *packed, n, group_size, symmetric)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 33, 64])
@pytest.mark.parametrize("n, k, group_size", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a8_nmajor_kernel_matches_reference(m, n, k, group_size, symmetric):
    rows, packed = packed_w4(n, k, group_size, symmetric, seed=m)
    x = torch.randn(m, k)
    x[:, 1] *= 20  # one large activation: its group's int8 scale is coarse, the others' are not
    expected = ops.w4a8_linear_reference(x, *rows, group_size, symmetric)
    got = ext.w4a8_linear_nmajor(x, *packed, n, group_size, symmetric)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    assert ext.w4a8_linear_nmajor(x.bfloat16(), *packed, n, group_size, symmetric).dtype == torch.bfloat16


@needs_kernels
def test_symmetric_weights_do_not_read_zs_and_int16_sums_do_not_overflow():
    n, k = 32, 256
    codes, ones = torch.full((n, k // 2), 0xFF, dtype=torch.uint8), torch.ones(n, 8)
    packed, scale, zs = repack.pack_w4_bf16(codes, k, False, ones, ones)
    x = torch.full((2, k), 1.0)
    x[1] = -1.0  # every code 15 against ±127: the largest int16 partial sums there are
    expected = repack.w4a8_linear_nmajor_reference(x, packed, scale, zs, n, 32, False)
    torch.testing.assert_close(ext.w4a8_linear_nmajor(x, packed, scale, zs, n, 32, False), expected)
    symmetric = ext.w4a8_linear_nmajor(x, packed, scale, torch.full_like(zs, float("nan")), n, 32, True)
    torch.testing.assert_close(symmetric, repack.w4a8_linear_nmajor_reference(x, packed, scale, zs, n, 32, True))


@needs_kernels
def test_w4a8_nmajor_refuses_a_packing_of_another_shape():
    _, packed = packed_w4(32, 128, 32, True)
    with pytest.raises(RuntimeError, match="packed must be"):
        ext.w4a8_linear_nmajor(torch.randn(1, 256), *packed, 32, 32, True)
    with pytest.raises(RuntimeError, match="scale and zs must be"):
        ext.w4a8_linear_nmajor(torch.randn(1, 128), *packed, 32, 64, True)


def w4a8_layer_holds_only_the_packing_and_computes_its_product():
    """Shared with the AVX2 check (tests/kernels/test_ops.py), which runs it with TUILI_ISA=avx2."""
    from tuili.quant import W4A8Linear

    torch.manual_seed(0)
    for symmetric in (True, False):
        layer = W4A8Linear.from_float(nn.Linear(200, 40), 4, 64, symmetric)
        codes, weight = layer.codes().clone(), layer.dequantize().clone()
        for m in (1, 5, 64, 300):  # every batch takes the kernel
            x = torch.randn(m, 200)
            expected = ops.quantize_groups(x, 64) @ weight.T + layer.bias
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
            assert layer.packed_call() is not None and layer._buffers["qweight"].is_meta
        torch.testing.assert_close(layer.weight_as(torch.float32), weight)  # a float weight from the packing
        torch.testing.assert_close(layer(x.bfloat16()).float(), expected, atol=0.3, rtol=0.02)
        state = layer.state_dict()  # saving puts the row layout back
        assert torch.equal(layer.codes(), codes) and not state["qweight"].is_meta
        assert torch.equal(layer.dequantize(), weight)


@pytest.mark.skipif(not repack.w4a8_nmajor(), reason="VNNI CPU: the AVX2 check runs this with TUILI_ISA=avx2")
def test_a_w4a8_layer_on_avx2_holds_only_the_packing():
    w4a8_layer_holds_only_the_packing_and_computes_its_product()


@pytest.mark.skipif(not repack.w4a8_nmajor(), reason="VNNI CPU: W4A8 keeps the row layout there")
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_served_w4a8_model_holds_the_packing_and_saves_what_it_was(tmp_path, symmetric):
    from helpers import random_tiny  # tests/ is on the path under pytest, not in the AVX2 check's process

    import tuili
    from tests.quant.test_packing import held_bytes
    from tuili.pipeline.analysis import analyze
    from tuili.quant import Int4WeightInt8Activation, quantize_

    model = random_tiny("llama-gqa")
    quantize_(model, Int4WeightInt8Activation(group_size=32, symmetric=symmetric), progress=False)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    before = analyze(model).num_bytes
    params = tuili.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(3, 140))  # a prefill chunk past 64 rows: the kernel too
    with ops.fallback():
        want = tuili.LLM(model).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = tuili.LLM(model)
    packed = [m for m in model.module.modules() if "_packed" in m.__dict__]
    assert len(packed) == 7 * model.config.num_hidden_layers  # packed as the engine starts
    packings = [m.__dict__["_packed"] for m in packed]
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert all(m.__dict__.get("_packed") is p for m, p in zip(packed, packings))  # never unpacked
    assert analyze(model).num_bytes == before
    assert held_bytes(model.module) <= (1.05 if symmetric else 1.25) * before  # symmetric: no zs held
    saved = tuili.load(model.save(tmp_path / "q"))
    assert all(torch.equal(v, state[k]) for k, v in saved.module.state_dict().items())
