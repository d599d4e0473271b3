"""tuili's model against transformers on tiny random configs of every supported architecture."""

import pytest
import torch
from helpers import CONFIGS, save_hf_tiny

import tuili
from tuili.models import ContiguousKVCache


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_tiny(request.param, folder)
    return hf, tuili.load(folder)


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = model.module(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_hidden_states_and_attentions_match_transformers(pair):
    hf, model = pair
    ids = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True, output_attentions=True)
    got = model.module(ids, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for g, e in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    for g, e in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_recomputation(pair):
    _, model = pair
    ids = torch.randint(0, 259, (2, 30), generator=torch.Generator().manual_seed(3))
    full = model.module(ids).logits
    cache = ContiguousKVCache(model.config, batch_size=2, max_len=30)
    steps = [model.module(ids[:, :12], torch.arange(12).expand(2, 12), cache).logits]
    for t in range(12, 30):  # one token at a time, as decoding does
        steps.append(model.module(ids[:, t : t + 1], torch.full((2, 1), t), cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_generate(pair):
    hf, model = pair
    from tuili.engine import SamplingParams, generate

    prompt = [5, 70, 80, 90, 100]
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    got = generate(model, prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert got.token_ids == expected


def test_last_only_returns_the_last_positions_logits(pair):
    _, model = pair
    ids = torch.randint(0, 259, (2, 10))
    torch.testing.assert_close(model.module(ids, last_only=True).logits, model.module(ids).logits[:, -1:])


def test_attention_probabilities_need_no_cache(pair):
    _, model = pair
    cache = ContiguousKVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="without a KV cache"):
        model.module(torch.zeros(1, 4, dtype=torch.long), cache=cache, output_attentions=True)


@pytest.mark.parametrize(
    "name, limits",
    [
        ("llama-rope-dynamic", {"max_position_embeddings": 12}),
        ("phi3-longrope", {"original_max_position_embeddings": 12}),
    ],
)
def test_rope_that_changes_with_length_matches_transformers_token_by_token(tmp_path, name, limits):
    # past the limit each new token takes the frequencies of its own position, as transformers'
    # cached decoding gives it; keys already cached keep theirs
    import transformers
    from helpers import CONFIGS, TINY, tiny_tokenizer
    from transformers import DynamicCache

    hf_dict = {**tuili.models.LlamaConfig.from_hf({**TINY, **CONFIGS[name], **limits}).to_hf()}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf_dict), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save(tmp_path)
    model = tuili.load(tmp_path)
    ids = torch.randint(0, 259, (1, 24), generator=torch.Generator().manual_seed(4))
    hf_cache, cache = DynamicCache(config=hf.config), ContiguousKVCache(model.config, batch_size=1, max_len=24)
    with torch.no_grad():
        expected = [hf(ids[:, :5], cache=hf_cache, use_cache=True).logits]
        got = [model.module(ids[:, :5], torch.arange(5)[None], cache).logits]
        for t in range(5, 24):
            expected.append(hf(ids[:, t : t + 1], cache=hf_cache, use_cache=True).logits)
            got.append(model.module(ids[:, t : t + 1], torch.full((1, 1), t), cache).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), atol=1e-4, rtol=0)
    rope = model.module.rotary_emb  # the limit was crossed: position 20 turns at other frequencies
    cos, _ = rope(torch.tensor([[20]]), torch.float32)
    assert not torch.allclose(cos[0, 0, : rope.inv_freq.numel()], (20 * rope.inv_freq).cos() * rope.scaling)
