import pytest
from helpers import random_tiny

from tuili.engine import SamplingParams, generate, stream
from tuili.engine.detokenize import TextStream


@pytest.fixture(scope="module")
def model():
    return random_tiny()


def test_generation_stops_at_max_tokens(model):
    done = generate(model, "hello", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 7 and done.finish_reason == "length"
    assert done.text == model.tokenizer.decode(done.token_ids)


def test_generation_stops_at_eos(model, monkeypatch):
    free = generate(model, "hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    third = free.token_ids[2]
    monkeypatch.setattr(type(model), "eos_token_ids", property(lambda self: {third}))
    done = generate(model, "hello", SamplingParams(max_tokens=12, temperature=0))
    first = free.token_ids.index(third)
    assert done.token_ids == free.token_ids[: first + 1] and done.finish_reason == "stop"


def test_stop_string_is_cut_and_never_streamed(model):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    free = generate(model, "abc", params).text
    stop = free[5:8]
    cut = free[: free.index(stop)]
    done = generate(model, "abc", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,)))
    assert done.text == cut and done.finish_reason == "stop"
    assert (
        "".join(stream(model, "abc", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))))
        == cut
    )


def test_stream_concatenates_to_generate(model):
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    assert "".join(stream(model, "xyz", params)) == generate(model, "xyz", params).text


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True)
    assert generate(model, "q", params).token_ids == generate(model, "q", params).token_ids


def test_chat_messages_use_the_template(model):
    done = generate(model, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2, temperature=0))
    expected = model.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert done.prompt_token_ids == expected


def test_context_overflow_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [1] * 250, SamplingParams(max_tokens=10))


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], SamplingParams(max_tokens=1))


def test_text_stream_never_splits_a_character(model):
    ids = model.tokenizer.encode("né 中文")
    stream_ = TextStream(model.tokenizer)
    pieces = [stream_.push(i) for i in ids]
    assert "".join(pieces) == "né 中文"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_token_ids_end_generation():
    from helpers import random_tiny

    from tuili.engine import SamplingParams, generate

    model = random_tiny("llama-gqa")
    free = generate(model, [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[2]
    cut = generate(
        model, [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_at,))
    )
    first = free.token_ids.index(stop_at)
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_repetition_penalty_changes_greedy_output_away_from_repeats():
    from helpers import random_tiny

    from tuili.engine import SamplingParams, generate

    model = random_tiny("llama-gqa")
    plain = generate(model, [5, 6, 7], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    penalized = generate(
        model, [5, 6, 7], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=5.0)
    )
    assert penalized.token_ids != plain.token_ids
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
