"""DynamicBatcher: concurrent submissions share a batch up to its size, its token budget and its
waiting time; each caller gets its own result; errors reach every caller of the failed batch."""

import asyncio

import pytest

from tuili.server import DynamicBatcher


class Recorder:
    def __init__(self, fail_on=None):
        self.batches, self.fail_on = [], fail_on

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        if self.fail_on in items:
            raise RuntimeError("bad batch")
        return [item * 10 for item in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_form_batches_of_at_most_max_batch_size():
    record = Recorder()

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=4, max_wait=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert [len(b) for b in record.batches] == [4, 4, 2]
    assert sorted(x for b in record.batches for x in b) == list(range(10))


def test_a_lone_item_runs_after_max_wait_not_later():
    record = Recorder()

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=8, max_wait=0.02)
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await batcher.submit(3)
        return result, loop.time() - start

    result, seconds = run(main())
    assert result == 30 and record.batches == [[3]]
    assert 0.02 <= seconds < 0.5


def test_items_arriving_while_a_batch_runs_form_the_next_batch():
    record = Recorder()

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=8, max_wait=0.0)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.005)  # the first batch is running (it sleeps 10 ms)
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        return await asyncio.gather(first, *rest)

    assert run(main()) == [10, 20, 30, 40]
    assert record.batches == [[1], [2, 3, 4]]


def test_the_token_budget_caps_padded_batch_size():
    record = Recorder()

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=16, max_wait=0.05, max_batch_tokens=10, size=lambda x: x)
        return await asyncio.gather(*(batcher.submit(n) for n in (2, 2, 3, 5, 5)))

    run(main())
    # 3 items padded to 3 = 9 tokens; adding the 5 would make 4 × 5 = 20 > 10; then 2 × 5 = 10
    assert record.batches == [[2, 2, 3], [5, 5]]


def test_a_failing_batch_raises_in_each_of_its_callers_only():
    record = Recorder(fail_on=2)

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=2, max_wait=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3, 4)), return_exceptions=True)

    results = run(main())
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert results[2:] == [30, 40]


def test_a_caller_that_gave_up_is_left_out_of_its_batch():
    record = Recorder()

    async def main():
        batcher = DynamicBatcher(record, max_batch_size=8, max_wait=0.05)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    assert run(main()) == 20
    assert record.batches == [[2]]


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_wait": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), **kwargs)
