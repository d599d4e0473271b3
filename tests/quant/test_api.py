import copy

import pytest
import torch
from helpers import random_tiny

from tuili.models.layerwise import Hessian
from tuili.quant import (
    AWQ,
    GPTQ,
    RTN,
    Int4WeightInt8Activation,
    Int4WeightOnly,
    Int8DynamicActivation,
    Int8Linear,
    Int8StaticActivation,
    Int8WeightOnly,
    SmoothQuant,
    W4A8Linear,
    WeightOnlyLinear,
    quantize_,
    scheme_from_name,
    select_linears,
)
from tuili.quant.gptq import gptq
from tuili.quant.primitives import quantize_weight, sqnr


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 259, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model():
    m = random_tiny("llama-mha-untied-bias")  # MHA: every smoothing group is foldable
    with torch.no_grad():
        for p in m.module.parameters():
            p.mul_(0.5)
    return m


CASES = [
    (Int8WeightOnly(), RTN(), WeightOnlyLinear, 35),
    (Int4WeightOnly(group_size=32), RTN(), WeightOnlyLinear, 12),
    (Int4WeightOnly(group_size=32), GPTQ(), WeightOnlyLinear, 12),
    (Int4WeightOnly(group_size=32), GPTQ(act_order=True), WeightOnlyLinear, 12),
    (Int4WeightOnly(group_size=32), AWQ(grid=5), WeightOnlyLinear, 12),
    (Int4WeightInt8Activation(group_size=32), RTN(), W4A8Linear, 12),
    (Int4WeightInt8Activation(group_size=64), GPTQ(), W4A8Linear, 10),
    (Int8DynamicActivation(), RTN(), Int8Linear, 25),
    (Int8DynamicActivation(), SmoothQuant(), Int8Linear, 25),
    (Int8StaticActivation(), SmoothQuant(alpha=0.5), Int8Linear, 20),
    (Int8StaticActivation(), SmoothQuant(alpha="auto"), Int8Linear, 20),
    (Int8DynamicActivation(), SmoothQuant(alpha="auto"), Int8Linear, 25),
    (Int8StaticActivation(), SmoothQuant(alpha="auto", gptq=True), Int8Linear, 20),
    (Int8StaticActivation("mse"), RTN(), Int8Linear, 20),
]


@pytest.mark.parametrize(
    "scheme, method, cls, min_db", CASES, ids=lambda c: getattr(c, "scheme", getattr(c, "name", ""))
)
def test_quantized_model_tracks_float(model, calib, scheme, method, cls, min_db, kernel_path):
    ref = copy.deepcopy(model.module)
    quantize_(model, scheme, method, calib=calib, progress=False)
    layers = [m for m in model.module.modules() if isinstance(m, cls)]
    assert len(layers) == 2 * 7  # every decoder linear; lm_head ignored by default
    assert isinstance(model.module.lm_head, torch.nn.Linear)
    ids = calib[:2]
    assert sqnr(ref(ids).logits, model.module(ids).logits) > min_db
    assert model.provenance[-1]["step"] == "quantized"


def test_targets_ignore_and_overrides(model):
    quantize_(
        model,
        Int4WeightOnly(group_size=32),
        targets=["*mlp*"],
        ignore=["down_proj"],
        overrides={"*.up_proj": Int8WeightOnly()},
    )
    layer = model.module.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, torch.nn.Linear) and isinstance(layer.mlp.down_proj, torch.nn.Linear)
    assert layer.mlp.gate_proj.bits == 4 and layer.mlp.up_proj.bits == 8


def test_where_predicate(model):
    quantize_(model, Int8WeightOnly(), where=lambda name, m: name.endswith("o_proj"))
    assert len(select_linears(model.module)) == 2 * 6


def test_quantized_model_really_shrinks(model):
    from tuili.pipeline import analyze

    before = analyze(model)
    quantize_(model, Int4WeightOnly(group_size=32), ignore=[])
    after = analyze(model)
    for kind in ("mlp linear", "attention linear", "lm_head"):  # 4-bit codes + a scale and zero per 32
        assert after.bytes_by_kind[kind] < 0.25 * before.bytes_by_kind[kind]


@pytest.mark.parametrize(
    "scheme, method, message",
    [
        (Int8DynamicActivation(), GPTQ(), "quantizes weights only"),
        (Int4WeightOnly(), SmoothQuant(), "prepares activations"),
        (Int4WeightOnly(), GPTQ(), "needs calibration samples"),
        (Int8StaticActivation(), RTN(), "needs calibration samples"),
    ],
)
def test_bad_combinations_are_refused(model, scheme, method, message):
    with pytest.raises(ValueError, match=message):
        quantize_(model, scheme, method)


def test_nothing_selected_is_an_error(model):
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_(model, Int8WeightOnly(), targets=["nothing*"])


def test_calibrated_methods_need_tuili_model(model, calib):
    with pytest.raises(ValueError, match="needs tuili's own model"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), Int4WeightOnly(group_size=32), GPTQ(), calib=calib)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=48), "group_size must be"),
        (dict(bits=8), "takes 2 to 4 bits"),
        (dict(bits=0), "bits must be"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int4WeightOnly(**kwargs)


def test_scheme_names():
    assert scheme_from_name("w4a16", 64) == Int4WeightOnly(group_size=64)
    assert scheme_from_name("w8a8-static") == Int8StaticActivation()
    with pytest.raises(ValueError, match="unknown scheme 'w3a3'"):
        scheme_from_name("w3a3")


def reference_gptq(w, hessian, bits, group_size, symmetric, damp=0.01, block_size=128, act_order=False):
    """GPTQ written as the paper's Algorithm 1 reads (columns of W, copies, no in-place tricks)."""
    from tuili.quant.primitives import fake_quantize, qparams, quantize_weight_with, split_groups

    rows, cols = w.shape
    W, H = w.clone().float(), hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = torch.ones(rows, cols // group_size), torch.zeros(rows, cols // group_size)
    perm = torch.arange(cols)
    if act_order:
        groups = split_groups(W, group_size)
        scale, zero = qparams(groups.amin(-1), groups.amax(-1), bits, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:
                ahead = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :group_size]
                scale[:, g], zero[:, g] = qparams(ahead.amin(1), ahead.amax(1), bits, symmetric)
            q_col = fake_quantize(W1[:, i], scale[:, g], zero[:, g], bits, symmetric)
            Q[:, i1 + i] = q_col
            err = (W1[:, i] - q_col) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return quantize_weight_with(Q[:, torch.argsort(perm)], scale, zero, bits, group_size, symmetric)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_gptq_equals_the_papers_algorithm(act_order, bits, symmetric):
    """tuili's GPTQ (transposed, in place) rounds as Algorithm 1 does: codes equal but for the rare
    column whose value lands on a rounding boundary after float reassociation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g)
    x[:, 7] = 0  # a dead input
    w = torch.randn(96, 256, generator=g)
    h = Hessian(256)
    h.add(x)
    got = gptq(w, h.value(), bits, 64, symmetric, block_size=32, act_order=act_order)
    want = reference_gptq(w, h.value(), bits, 64, symmetric, block_size=32, act_order=act_order)
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-5, atol=0)
    assert (got.q != want.q).float().mean() < 1e-3
    assert torch.equal(got.zero, want.zero)


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    mix = torch.randn(64, 64)
    x = torch.randn(2048, 64) @ mix  # strongly correlated features, as in real activations
    w = torch.randn(32, 64)
    h = Hessian(64)
    h.add(x)
    rtn = quantize_weight(w, 4, 32, False).dequantize()
    for act_order in (False, True):
        g = gptq(w, h.value(), 4, 32, False, act_order=act_order).dequantize()
        assert (x @ (w - g).T).pow(2).mean() < 0.7 * (x @ (w - rtn).T).pow(2).mean()


@pytest.mark.parametrize("static", [False, True])
def test_alpha_search_beats_the_fixed_alphas_it_tries(static):
    """On inputs with outlier channels, the searched α's int8 output error is the least of the grid's,
    measured here independently with Int8Linear layers."""
    from tuili.quant.smooth import SmoothGroup
    from tuili.quant.smoothquant import search_alpha, smoothing_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17]] *= 40
    norm = torch.nn.LayerNorm(64)
    linears = {"a": torch.nn.Linear(64, 32, bias=False), "b": torch.nn.Linear(64, 16, bias=False)}
    group = SmoothGroup(norm, linears)
    act_max = x.abs().amax(0)
    alpha, s = search_alpha(group, x, act_max, static)

    def error(scale):
        err = 0.0
        for m in linears.values():
            smoothed = copy.deepcopy(m)
            smoothed.weight.data = m.weight * scale
            q = Int8Linear.from_float(smoothed, (act_max / scale).max() / 127 if static else None)
            err += (q(x / scale) - m(x)).pow(2).sum().item()
        return err

    errors = {a: error(smoothing_scale(act_max, group_column_max(linears), a)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert error(s) <= min(errors.values()) * 1.0001
    assert 0 < alpha < 1  # outliers this large want some migration, not all


def group_column_max(linears):
    return torch.stack([m.weight.abs().amax(0) for m in linears.values()]).amax(0)


@pytest.mark.parametrize("n", [100, 300])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(n, monkeypatch):
    """The reversed-order factor with blocked inversion (small blocks here, so that the recursion
    runs) equals factor → invert → factor again."""
    from tuili.quant import gptq as gptq_module

    real = gptq_module._invert_upper_
    monkeypatch.setattr(gptq_module, "_invert_upper_", lambda r, leaf=2048: real(r, 32))
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / n
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(gptq_module.inverse_hessian_factor(h.clone(), 0.01), want, rtol=0, atol=1e-12)
