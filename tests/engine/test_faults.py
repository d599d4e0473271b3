"""A fault in one request's own work ends that request alone; a fault in the shared work stops the engine."""

import asyncio

import pytest
from helpers import random_tiny

from tuili.engine import LLM, AsyncLLM, LLMEngine, SamplingParams
from tuili.errors import RequestFailed

PROMPTS = {f"r{i}": [5 + i, 17, 42 + 3 * i, 9] for i in range(4)}
PARAMS = {
    "r0": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    "r1": SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True),
    "r2": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
    "r3": SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True, repetition_penalty=1.3),
}


@pytest.fixture(scope="module")
def model():
    return random_tiny("llama-gqa")


def fail_on(engine: LLMEngine, request_id: str, after: int) -> None:
    """Make `request_id`'s own work raise once it has `after` tokens."""
    pick = engine._pick

    def faulty(request, row, greedy, allowed):
        if request.id == request_id and len(request.output_ids) == after:
            raise RuntimeError("injected fault")
        return pick(request, row, greedy, allowed)

    engine._pick = faulty


def run(engine: LLMEngine, ids: list[str]) -> dict:
    for request_id in ids:
        engine.add_request(PROMPTS[request_id], PARAMS[request_id], request_id)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_a_failing_request_leaves_the_others_with_the_tokens_they_would_have_had_alone(model):
    alone = {rid: run(LLMEngine(model, block_size=4), [rid])[rid].token_ids for rid in PROMPTS}
    engine = LLMEngine(model, block_size=4)
    fail_on(engine, "r1", after=5)
    finals = run(engine, list(PROMPTS))
    failed = finals.pop("r1")
    assert failed.finish_reason == "error" and "injected fault" in failed.error
    assert failed.token_ids == alone["r1"][:5]
    assert {rid: out.token_ids for rid, out in finals.items()} == {rid: alone[rid] for rid in finals}
    assert all(out.finish_reason == "length" and out.error is None for out in finals.values())
    assert engine.stats()["kv_usage"] == 0 and not engine.requests  # its blocks were freed
    assert run(engine, ["r0"])["r0"].token_ids == alone["r0"]  # and the engine goes on serving


def test_the_offline_api_raises_for_a_failed_request(model):
    llm = LLM(model, block_size=4)
    fail_on(llm.engine, "req-1", after=0)
    with pytest.raises(RequestFailed, match="injected fault"):
        llm.generate([PROMPTS["r0"], PROMPTS["r1"]], SamplingParams(max_tokens=4, temperature=0))
    assert not llm.engine.requests and llm.engine.stats()["kv_usage"] == 0
    assert len(llm.generate(PROMPTS["r0"], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_async_streams_see_their_own_fault_only_and_a_shared_fault_stops_the_engine(model):
    llm = AsyncLLM(model, block_size=4)
    fail_on(llm.engine, "bad", after=2)

    async def collect(request_id):
        tokens = []
        async for out in llm.generate(PROMPTS["r0"], PARAMS["r0"], request_id):
            tokens = out.token_ids
        return tokens

    async def batch():
        return await asyncio.gather(collect("good-1"), collect("bad"), collect("good-2"), return_exceptions=True)

    good1, bad, good2 = asyncio.run(batch())
    assert isinstance(bad, RequestFailed) and "injected fault" in str(bad)
    assert len(good1) == len(good2) == 12 and good1 == good2
    assert llm.alive

    def broken_forward(chunks):
        raise RuntimeError("the KV cache is corrupt")

    llm.engine._forward = broken_forward
    with pytest.raises(RuntimeError, match="the engine failed: the KV cache is corrupt"):
        asyncio.run(collect("doomed"))
    assert not llm.alive and "corrupt" in str(llm.error)
    llm.shutdown()
