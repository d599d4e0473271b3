"""`LLM` in vLLM's shape: code written for vLLM's offline API runs unchanged on tuili."""

import pytest
import torch
from helpers import random_tiny

from tuili.engine import LLM, SamplingParams
from tuili.engine.pooling import embed

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(model=random_tiny("llama-gqa"), block_size=4)


def test_every_prompt_form_and_vllms_output_shape(llm):
    ids = llm.get_tokenizer().encode("hello there")
    chat = [{"role": "user", "content": "hello there"}]
    outputs = llm.generate(
        ["hello there", {"prompt": "hello there"}, {"prompt_token_ids": ids}, ids, chat], sampling_params=GREEDY
    )
    assert [o.prompt for o in outputs] == ["hello there", "hello there", None, None, None]
    assert all(o.prompt_token_ids == ids for o in outputs[:4]) and outputs[4].prompt_token_ids != ids
    first = outputs[0].outputs[0]
    assert (first.index, len(first.token_ids), first.finish_reason) == (0, 6, "length")
    assert first.text == llm.get_tokenizer().decode(first.token_ids)
    assert all(o.outputs[0].token_ids == first.token_ids for o in outputs[:4])
    assert all(o.finished and len(o.outputs) == 1 and o.outputs[0].logprobs is None for o in outputs)


def test_n_choices_use_seeds_seed_plus_j(llm):
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=41, ignore_eos=True)
    (out,) = llm.generate("once upon", params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for j, choice in enumerate(out.outputs):
        alone = llm.generate("once upon", SamplingParams(max_tokens=8, temperature=1.0, seed=41 + j, ignore_eos=True))
        assert choice.token_ids == alone[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    wrapped = llm.generate("x", SamplingParams(n=2, max_tokens=2, seed=2**63 - 1))  # seed + 1 wraps to -2**63
    assert len(wrapped[0].outputs) == 2


def test_chat_takes_one_conversation_or_several(llm):
    one = [{"role": "user", "content": "hi"}]
    two = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert llm.chat(one, GREEDY)[0].outputs[0].token_ids == llm.generate([one], GREEDY)[0].outputs[0].token_ids
    both = llm.chat([one, two], GREEDY)
    assert [o.outputs[0].token_ids for o in both] == [o.outputs[0].token_ids for o in llm.generate([one, two], GREEDY)]


def test_embed_gives_unit_vectors_of_the_pooled_hidden_states(llm):
    outs = llm.embed(["a sentence", {"prompt_token_ids": [5, 6, 7]}])
    expected = embed(llm.model, [llm.get_tokenizer().encode("a sentence"), [5, 6, 7]])
    got = torch.tensor([o.outputs.embedding for o in outs])
    torch.testing.assert_close(got, expected)
    assert outs[1].prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt": "a", "multi_modal_data": {}}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt_token_ids": [10**6]}, "vocabulary"),
    ],
)
def test_prompts_it_cannot_run_are_refused(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY)


def test_the_documented_verbs_are_exported_from_tuili():
    import tuili

    assert tuili.LLM is LLM and tuili.SamplingParams is SamplingParams
    for name in ("load", "quantize_", "prune_", "optimize", "search", "TuiliError", "RequestFailed"):
        assert callable(getattr(tuili, name)), name
