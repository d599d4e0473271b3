"""Drafts made from their target: training text of the target's own answers, and the report of what
a draft buys (its acceptance rate and speed-up, with output identical to plain decoding)."""

from helpers import random_tiny

from tuili.pipeline.draft import draft_report, prompts, self_outputs


def test_prompts_come_from_the_split_asked_for():
    train, held_out = prompts(6, "calibration"), prompts(6, "evaluation")
    assert len(train) == 6 and all(p[0]["role"] == "user" for p in train)
    assert not {p[0]["content"] for p in train} & {p[0]["content"] for p in held_out}


def test_self_outputs_are_conversations_the_target_answered():
    target = random_tiny("llama-gqa", max_position_embeddings=4096)
    text = self_outputs(target, 3, max_tokens=6)
    assert text.count("<|im_start|>assistant\n") == 3 and text.count("<|im_start|>user\n") == 3
    answers = [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>assistant\n")[1:]]
    assert all(answers)


def test_a_draft_that_is_its_target_is_always_accepted_and_changes_nothing():
    target = random_tiny("llama-gqa", max_position_embeddings=4096)
    other = random_tiny("llama-gqa", seed=4, max_position_embeddings=4096)
    same = draft_report(target, target, count=2, tokens=3, rounds=1)
    assert same["acceptance_rate"] == 1.0 and same["identical_to_plain"]
    assert 3.5 < same["tokens_a_check"] <= 4.0  # fewer drafts fit in the last steps before max_tokens
    poor = draft_report(target, other, count=2, tokens=3, rounds=1)
    assert poor["acceptance_rate"] < 0.5 and poor["identical_to_plain"]
