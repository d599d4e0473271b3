"""Each family at the shapes of a published checkpoint (tests/published.py: hidden size, heads,
head_dim, MLP and expert widths, RoPE, soft caps), two decoder layers and the tiny tokenizer's
vocabulary: tuili's fp32 logits equal transformers' within 1e-4, and its greedy tokens through the
engine equal a full recomputation."""

import pytest
import torch
from helpers import save_hf
from published import PUBLISHED, reduced

import tuili
from tuili.engine import LLM, SamplingParams
from tuili.models import LlamaConfig

VOCAB = 259  # the tiny tokenizer's
EXPERTS = {"Qwen3-30B-A3B": 16, "Mixtral-8x7B": 2}  # fewer experts: one Mixtral layer holds 1.4B weights


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_match_transformers(tmp_path, name):
    config = LlamaConfig.from_hf(reduced(name, layers=2, vocab=VOCAB, experts=EXPERTS.get(name)))
    hf = save_hf(config, tmp_path)
    model = tuili.load(tmp_path)
    for shard in tmp_path.glob("*.safetensors"):  # up to 3 GB a family: not left for pytest to keep
        shard.unlink()
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model.module(ids).logits
    del hf
    assert expected.abs().max() > 1e-2  # the comparison sees real values, not a vanishing signal
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    prompt = ids[0, :8].tolist()
    out = LLM(model, bf16_activations=False).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )[0]
    with torch.no_grad():
        full = model.module(torch.tensor([prompt + out.outputs[0].token_ids[:-1]])).logits[0, 7:].argmax(-1)
    assert out.outputs[0].token_ids == full.tolist()
