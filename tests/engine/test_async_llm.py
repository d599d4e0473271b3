"""AsyncLLM: concurrent requests stream from one engine thread; leaving a stream aborts it."""

import asyncio

import pytest
from helpers import random_tiny

from tuili.engine import LLM, AsyncLLM, SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_tiny("llama-gqa")


@pytest.fixture
def llm(model):
    engine = AsyncLLM(model, block_size=4, prefix_caching=False)
    yield engine
    engine.shutdown()


async def collect(llm, prompt, params=PARAMS):
    outs = [out async for out in llm.generate(prompt, params)]
    return outs


def test_concurrent_streams_equal_offline_generation(model, llm):
    prompts = [[1, 2, 3], list(range(40, 70)), [7]]

    async def main():
        return await asyncio.gather(*(collect(llm, p) for p in prompts))

    results = asyncio.run(main())
    offline = LLM(model).generate(prompts, PARAMS)
    for outs, expected in zip(results, offline):
        assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
        assert "".join(o.delta for o in outs) == expected.text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_leaving_a_stream_early_aborts_it_and_frees_its_blocks(llm):
    async def main():
        async for out in llm.generate([1, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)):
            if len(out.token_ids) == 3:
                break
        for _ in range(100):  # the engine thread applies the abort between steps
            if not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    allocator = llm.engine.cache.allocator
    assert not llm.engine.has_unfinished() and allocator.num_free == allocator.num_blocks


def test_abort_ends_the_stream_with_reason_abort(llm):
    async def main():
        outs = []
        async for out in llm.generate(
            [4, 5], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), request_id="r1"
        ):
            outs.append(out)
            if len(outs) == 2:
                await llm.abort("r1")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 200


def test_a_bad_request_fails_before_it_is_queued(llm):
    async def main():
        async for _ in llm.generate([1] * 300, PARAMS):
            pass

    with pytest.raises(ValueError, match="context"):
        asyncio.run(main())


def test_an_engine_failure_reaches_every_waiting_stream(model):
    llm = AsyncLLM(model, block_size=4)

    def broken():
        raise RuntimeError("kernel exploded")

    llm.engine.step = broken

    async def main():
        async for _ in llm.generate([1, 2, 3], PARAMS):
            pass

    with pytest.raises(RuntimeError, match="kernel exploded"):
        asyncio.run(main())
    assert isinstance(llm.error, RuntimeError)
    with pytest.raises(RuntimeError, match="the engine has stopped"):
        asyncio.run(main())
    llm.shutdown()
