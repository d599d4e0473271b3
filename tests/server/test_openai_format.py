"""Stream chunks: the per-token fast path writes exactly the object the general path builds."""

import json

import pytest

from tuili.engine.request import RequestOutput
from tuili.server.openai import Formatter


class Tokens:
    def of(self, token_id):
        return str(token_id)


def output(delta):
    return RequestOutput("r", delta, [1], delta, [1], [5], False, None, [], [], 0, 0.0, None, None, None)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("delta", ["a", ' "quoted" \\ back', "\n\t", "héllo 你好 🙂", "</s>"])
def test_fast_chunks_equal_the_general_form(chat, include_usage, delta):
    fmt = Formatter("cmpl-1", "m", 123, chat, Tokens(), logprobs=False, include_usage=include_usage)
    chunk = fmt.delta_chunk(2, output(delta))
    assert chunk.startswith("data: ") and chunk.endswith("\n\n")
    choice = {"index": 2, "logprobs": None, "finish_reason": None}
    choice.update({"delta": {"content": delta}} if chat else {"text": delta})
    general = json.loads(fmt._chunk([choice])[6:])
    assert json.loads(chunk[6:]) == general
    assert general["object"] == ("chat.completion.chunk" if chat else "text_completion")
    assert ("usage" in general) == include_usage


@pytest.mark.parametrize("chat", [False, True])
def test_fast_chunks_carry_continuous_usage_as_the_general_form(chat):
    fmt = Formatter("cmpl-1", "m", 123, chat, Tokens(), logprobs=False, include_usage=True, continuous_usage=True)
    so_far = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    chunk = fmt.delta_chunk(0, output("a"), so_far)
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    choice.update({"delta": {"content": "a"}} if chat else {"text": "a"})
    assert json.loads(chunk[6:]) == json.loads(fmt._chunk([choice], so_far)[6:])
    assert json.loads(chunk[6:])["usage"] == so_far
