import pytest
import torch
from helpers import random_tiny

from tuili.pipeline import analyze
from tuili.pipeline.analysis import analysis_markdown


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa-tied", "llama-mha-untied-bias", "qwen2"])
def test_parameter_count_matches_the_config(name):
    model = random_tiny(name)
    a = analyze(model)
    assert a.num_parameters == model.config.num_parameters()
    assert a.num_parameters == sum(p.numel() for p in model.module.parameters())  # tied counted once
    assert a.num_bytes == 4 * a.num_parameters


def test_bytes_follow_the_dtype():
    model = random_tiny()
    model.module.to(torch.bfloat16)
    a = analyze(model)
    assert a.bytes_by_dtype == {"bfloat16": 2 * a.num_parameters}


def test_flops_and_kv_cache_formulas():
    model = random_tiny("llama-gqa")  # 2 layers, 4 heads × 16, 2 KV heads, hidden 64, mlp 96, vocab 259
    a = analyze(model, context_len=100, batch_size=3)
    linear = 2 * 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 2 * 64 * 259
    per_key = 4 * 4 * 16 * 2
    assert a.decode_flops_per_token == linear + per_key * 100
    assert a.prefill_flops_per_token == linear + per_key * 101 / 2
    assert a.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert a.kv_cache_bytes == a.kv_bytes_per_token * 300
    assert a.memory_bytes == a.num_bytes + a.kv_cache_bytes


def test_markdown_lists_every_part():
    text = analysis_markdown(analyze(random_tiny()))
    for part in ("embedding", "attention linear", "mlp linear", "norm", "total", "float32", "decode FLOPs"):
        assert part in text


def test_bad_workload_is_refused():
    with pytest.raises(ValueError, match="positive"):
        analyze(random_tiny(), context_len=0)
