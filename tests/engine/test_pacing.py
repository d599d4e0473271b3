"""Stall-free batching: prompt chunks beside decodes are sized from measured step times, decoding
streams get a token every step while a long prompt is prefilled, and the tokens stay exact."""

import time

import pytest
from helpers import random_tiny

from tuili.engine import LLM, LLMEngine, SamplingParams
from tuili.engine.pacing import StepPacer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_the_prefill_budget_fills_the_time_a_step_has_left():
    pacer = StepPacer(target_itl=0.05, min_prefill_tokens=8)
    assert pacer.prefill_budget(0, 500) == 500  # nothing decodes: nobody waits for the step
    assert pacer.prefill_budget(4, 500) == 8  # nothing timed yet: a small chunk to learn from
    pacer.observe(4, 0, 0.02)  # a decode-only step: 20 ms
    pacer.observe(4, 100, 0.12)  # 100 prompt tokens beside the decodes added 100 ms
    assert pacer.token_time == pytest.approx(0.001)
    assert pacer.prefill_budget(4, 500) == 30  # (50 - 20) ms / 1 ms a token
    assert pacer.prefill_budget(4, 20) == 20  # never more than the step's budget
    pacer.observe(4, 0, 0.2)  # decoding alone now takes longer than the target
    assert pacer.prefill_budget(4, 500) == 8  # prefill still progresses
    pacer.observe(4, 3, 5.0)  # a short prompt's step is mostly fixed cost: not a token's price
    assert pacer.token_time == pytest.approx(0.001)


def test_without_a_target_every_step_takes_the_whole_budget():
    pacer = StepPacer(target_itl=None)
    pacer.observe(4, 0, 1.0)
    assert pacer.prefill_budget(4, 300) == 300


@pytest.mark.parametrize("bad", [{"target_itl": 0}, {"target_itl": -1.0}, {"min_prefill_tokens": 0}])
def test_a_pacing_setting_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError, match="target_itl|min_prefill_tokens"):
        StepPacer(**bad)


def test_decoding_streams_get_a_token_every_step_while_a_long_prompt_prefills():
    model = random_tiny("llama-gqa")
    engine = LLMEngine(model, block_size=4)
    engine.scheduler.pacer = StepPacer(target_itl=1e-9, min_prefill_tokens=5)  # decodes alone exceed it
    steps = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    engine.add_request([1, 2, 3], GREEDY)
    engine.step()  # the short request's prompt: now it decodes
    engine.add_request(list(range(30, 70)), GREEDY)  # 40 tokens: 8 chunks of 5
    for step in range(8):
        done = {o.request_id for o in engine.step()}
        assert done == ({"req-0", "req-1"} if step == 7 else {"req-0"})  # the last chunk: a first token
        assert [(c.request.id, c.length) for c in steps[-1]] == [("req-0", 1), ("req-1", 5)]


def test_paced_and_unpaced_engines_give_the_same_tokens():
    model = random_tiny("llama-gqa")
    prompts = [[5, 9, 100, 7, 3], list(range(20, 90)), [200, 201], list(range(60, 140))]
    free = LLM(model, block_size=4, target_itl=None).generate(prompts, GREEDY)
    paced = LLM(model, block_size=4)
    paced.engine.scheduler.pacer = StepPacer(target_itl=1e-9, min_prefill_tokens=3)
    assert [o.token_ids for o in paced.generate(prompts, GREEDY)] == [o.token_ids for o in free]


def test_a_request_that_cannot_start_in_time_ends_unstarted():
    model = random_tiny("llama-gqa")
    engine = LLMEngine(model, block_size=4, max_num_seqs=1, max_queue_time=0.05)
    engine.add_request([1, 2, 3], GREEDY)
    engine.add_request([4, 5, 6], GREEDY)  # no place: the batch holds one sequence
    engine.step()
    time.sleep(0.1)
    outs = {o.request_id: o for o in engine.step()}
    late = outs["req-1"]
    assert late.finished and late.finish_reason == "queue_timeout" and late.token_ids == []
    assert "overloaded" in late.error and late.scheduled_time is None
    assert not outs["req-0"].finished  # the running one goes on
    assert engine.stats()["waiting"] == 0 and engine.stats()["max_queue_time"] == 0.05


def test_a_started_request_is_never_expired_by_the_queue_limit():
    model = random_tiny("llama-gqa")
    engine = LLMEngine(model, block_size=4, max_queue_time=0.01)
    engine.add_request([1, 2, 3], GREEDY)
    engine.step()
    time.sleep(0.05)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finish_reason in (None, "length")


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_queue_limit_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError, match="max_queue_time"):
        LLMEngine(random_tiny("llama-gqa"), max_queue_time=bad)
