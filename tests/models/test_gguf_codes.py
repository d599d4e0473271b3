"""GGUF files used as they are: each block type tuili keeps is read into codes and scales that
dequantize to exactly what llama.cpp's own reader gives, and a model loaded with keep_quantized
runs from those codes (engine, C++ step, save, export)."""

import gguf
import numpy as np
import pytest
import torch
from helpers import random_tiny

import tuili
from tuili.engine import LLM, SamplingParams
from tuili.engine.step import DecodeStep
from tuili.models.gguf import _codes
from tuili.pipeline.gguf_export import export_gguf
from tuili.quant import Int4WeightOnly, Int8WeightOnly, quantize_
from tuili.quant.linear import QuantizedEmbedding, WeightOnlyLinear

T = gguf.GGMLQuantizationType
ROWS, COLS = 8, 512


def random_blocks(kind: T, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of `kind` for a (ROWS, COLS) tensor: random codes, finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    if kind in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0):  # the gguf package quantizes these itself
        return gguf.quants.quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), kind)
    raw = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind == T.Q4_K:
        raw[:, 0:4] = scales.reshape(-1, 2, 2).reshape(raw.shape[0], 4)[:, :4]  # d and dmin
    else:  # Q6_K: d last
        raw[:, -2:] = scales[:, :2]
    return raw.reshape(ROWS, -1)


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda k: k.name)
def test_codes_dequantize_to_what_llama_cpps_reader_gives(tmp_path, kind):
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    writer.add_tensor("w", random_blocks(kind, np.random.default_rng(0)), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(tmp_path / "t.gguf").tensors
    w = _codes(tensor)
    assert w is not None and w.block_type == kind.name
    layer = WeightOnlyLinear.from_codes(w.codes, w.scale, w.offset, w.bits, w.group_size)
    expected = gguf.quants.dequantize(tensor.data, kind).reshape(ROWS, COLS)
    assert torch.equal(layer.dequantize(), torch.from_numpy(expected))
    rows = torch.tensor([5, 0, 5])
    assert torch.equal(layer.dequantize_rows(rows), layer.dequantize()[rows])
    x = torch.randn(3, COLS)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, atol=1e-4, rtol=1e-4)  # through the kernels


@pytest.fixture(params=[("llama-gqa", Int4WeightOnly(32)), ("qwen2", Int4WeightOnly(32, symmetric=True))], ids=str)
def gguf_file(request, tmp_path):
    name, scheme = request.param
    model = quantize_(random_tiny(name), scheme, progress=False)
    quantize_(model, Int8WeightOnly(32), targets=["lm_head"], ignore=[], progress=False)
    return export_gguf(model, tmp_path / "m.gguf", "f32").path


def test_a_gguf_runs_from_its_codes(gguf_file):
    dequantized, kept = tuili.load(gguf_file), tuili.load(gguf_file, keep_quantized=True)
    layers = [m for m in kept.module.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 7 * kept.config.num_hidden_layers + 1  # every linear layer, the head too
    assert kept.provenance[-1]["kept_quantized"] == len(layers)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(kept.module(ids).logits, dequantized.module(ids).logits, atol=1e-4, rtol=0)
    assert DecodeStep(kept.module).applies(None)  # the C++ step runs the codes
    prompt = [5, 70, 80, 90]
    got = LLM(kept).generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(kept.module(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got[0].outputs[0].token_ids == ids[len(prompt) :]


def test_codes_with_float_minimums_are_not_saved_as_compressed_tensors(tmp_path, gguf_file):
    kept = tuili.load(gguf_file, keep_quantized=True)
    if kept.module.model.layers[0].mlp.up_proj.offset is None:  # Q4_0: integer codes, saved as usual
        again = tuili.load(kept.save(tmp_path / "saved"))
        ids = torch.randint(3, 259, (1, 12))
        assert torch.equal(again.module(ids).logits, kept.module(ids).logits)
        return
    with pytest.raises(tuili.ModelFormatError, match="float minimums per group .Q4_1, Q4_K."):
        kept.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    back = export_gguf(kept, tmp_path / "again.gguf", "f32")  # GGUF holds them as they are
    assert back.tensor_types["Q4_1"] == 7 * kept.config.num_hidden_layers and not back.dequantized


def test_an_embedding_reads_a_tied_heads_codes():
    head = WeightOnlyLinear.from_float(torch.nn.Linear(64, 259, bias=False), 8, 32, True)
    embed = QuantizedEmbedding(head)
    ids = torch.tensor([[3, 258, 3], [0, 1, 2]])
    assert torch.equal(embed(ids), head.dequantize()[ids])
    assert embed.state_dict() == {}  # the codes are the head's, stored once
    assert torch.equal(embed.table(), head.dequantize())
