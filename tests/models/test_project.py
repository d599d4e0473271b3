"""project(): linear layers that read the same input (q/k/v, gate/up) in one kernel call give what
each layer gives alone, and step aside for autograd, hooks and mixed layer kinds."""

import pytest
import torch

from tuili.models.llama import Linear, project
from tuili.quant.linear import Int8Linear, WeightOnlyLinear


def linears(bias, seed=0):
    torch.manual_seed(seed)
    return tuple(Linear(96, n, bias=bias) for n in (96, 32, 32))


def convert(kind, layers):
    if kind == "fp32":
        return layers
    if kind == "w8":
        return tuple(WeightOnlyLinear.from_float(m, 8, "channel", True) for m in layers)
    if kind == "w4-asym":
        return tuple(WeightOnlyLinear.from_float(m, 4, 32, False) for m in layers)
    return tuple(WeightOnlyLinear.from_float(m, 4, 32, True) for m in layers)


@pytest.mark.parametrize("kind", ["fp32", "w8", "w4-asym", "w4-sym"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_one_call_equals_separate_calls(kind, bias, rows):
    layers = convert(kind, linears(bias))
    x = torch.randn(rows, 1, 96)
    for got, layer in zip(project(x, layers), layers):
        torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mixed_kinds_and_large_batches_use_separate_calls():
    layers = linears(False)
    mixed = (layers[0], Int8Linear.from_float(layers[1]), layers[2])
    x = torch.randn(2, 5, 96)  # 10 rows: past the fp32 kernel's reach
    for group in (mixed, layers):
        for got, layer in zip(project(x, group), group):
            torch.testing.assert_close(got, layer(x))


def test_hooks_and_autograd_see_every_layer():
    layers = linears(True)
    seen = []
    handle = layers[1].register_forward_hook(lambda m, i, o: seen.append(m))
    with torch.no_grad():
        project(torch.randn(1, 1, 96), layers)
    handle.remove()
    assert seen == [layers[1]]
    x = torch.randn(1, 1, 96, requires_grad=True)
    sum(o.sum() for o in project(x, layers)).backward()
    assert x.grad is not None and layers[0].weight.grad is not None
