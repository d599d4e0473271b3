"""The real default model (SmolLM2-135M-Instruct) against transformers, on this machine's CPU."""

import math

import pytest
import torch

import tuili
from tuili.data import builtin_text, eval_windows, perplexity
from tuili.data.perplexity import window_nll
from tuili.engine import SamplingParams, generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def folder(default_model, tmp_path_factory):
    return default_model.save(tmp_path_factory.mktemp("default") / "smollm2")


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_answers_the_capital_of_france(default_model):
    done = generate(
        default_model,
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0),
    )
    assert "Paris" in done.text


def test_logits_match_transformers(default_model, hf):
    ids = torch.tensor([default_model.tokenizer.encode(builtin_text()[:2000])[:256]])
    with torch.no_grad():
        expected = hf(ids).logits
    got = default_model.module(ids).logits
    assert expected.abs().max() > 10  # real logits, not a degenerate model
    assert (got - expected).abs().max() <= 1e-3


def test_greedy_tokens_match_transformers(default_model, hf):
    for prompt in PROMPTS:
        ids = default_model.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
            )[0, len(ids) :].tolist()
        got = generate(default_model, ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        assert got.token_ids == expected, prompt


def test_perplexity_equals_transformers_within_a_tenth_of_a_percent(default_model, hf):
    windows = eval_windows(default_model.tokenizer.encode(builtin_text("evaluation")), 512, max_tokens=4096)
    ours = perplexity(default_model.module, windows, progress=False)
    with torch.no_grad():
        theirs = math.exp(sum(window_nll(hf(w[None]).logits, w[None]).item() for w in windows) / ours.num_tokens)
    assert ours.num_tokens == 8 * 511
    assert 5 < ours.perplexity < 40
    assert abs(ours.perplexity / theirs - 1) < 1e-3


def test_load_save_load_is_bit_exact(default_model, folder):
    again = tuili.load(folder)
    a, b = default_model.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.chat_template == default_model.tokenizer.chat_template


def test_dequantized_weights_equal_transformers_gguf_loader(default_model):
    pytest.importorskip("accelerate")
    path = tuili.models.default_model_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    ours = default_model.module.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_tokenizer_round_trips_the_corpus(default_model):
    text = builtin_text("all")
    assert default_model.tokenizer.decode(default_model.tokenizer.encode(text)) == text


def test_config_describes_smollm2(default_model):
    c = default_model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and default_model.eos_token_ids == {2}


def test_batched_engine_greedy_matches_transformers(default_model, hf):
    """Every prompt at once through continuous batching, prefill in chunks of 16 tokens: each
    completion equals transformers' own greedy generation of that prompt alone."""
    from tuili.engine import LLM

    prompts = [default_model.tokenizer.encode(p) for p in PROMPTS]
    outs = LLM(default_model, max_num_batched_tokens=16).generate(
        prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    )
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
            )[0, len(ids) :].tolist()
        assert out.token_ids == expected


def test_engine_logits_equal_recomputation_across_256_tokens(default_model):
    """The paged cache and the fast decode step against one full forward over the final sequence."""
    from tuili.engine import LLMEngine

    engine = LLMEngine(default_model, max_num_seqs=1)
    seen = []
    greedy = engine._greedy_tokens
    engine._greedy_tokens = lambda requests, logits: (seen.append(logits[0].clone()), greedy(requests, logits))[1]
    prompt = default_model.tokenizer.encode("The history of the printing press")
    engine.add_request(prompt, SamplingParams(max_tokens=256, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        out = engine.step()
    tokens = prompt + out[0].token_ids
    with torch.no_grad():
        full = default_model.module(torch.tensor([tokens[:-1]])).logits[0, len(prompt) - 1 :]
    assert len(seen) == 256
    assert (torch.stack(seen) - full).abs().max() <= 1e-3


def test_the_default_model_runs_from_its_own_q4_1_codes(default_model):
    from tuili.quant.linear import QuantizedEmbedding

    kept = tuili.load("default", keep_quantized=True)
    assert kept.provenance[-1]["block_types"] == ["Q4_1", "Q8_0"]
    assert isinstance(kept.module.model.embed_tokens, QuantizedEmbedding)  # token_embd's Q8_0 codes, tied
    weights = sum(t.numel() * t.element_size() for t in [*kept.module.parameters(), *kept.module.buffers()])
    assert weights <= 150 * 2**20  # 513 MiB dequantized to fp32
    ids = torch.tensor([default_model.tokenizer.encode(builtin_text()[:1000])[:128]])
    with torch.no_grad():
        diff = (kept.module(ids).logits - default_model.module(ids).logits).abs().max()
    assert diff < 1e-3  # the same weights; only the order of float operations differs
    for prompt in PROMPTS[:3]:
        ids = default_model.tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        assert generate(kept, ids, params).token_ids == generate(default_model, ids, params).token_ids
