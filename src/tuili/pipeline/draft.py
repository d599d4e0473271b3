"""A draft model for speculative decoding, made from its target: the training text is the target's
own answers (so the student learns to say what the target would say next, which is all a draft
is for), and the report measures what the draft buys: its acceptance rate and the batch-1 decode
speed-up of speculative decoding with it, against plain decoding of the same prompts.

    tuili distill --teacher default --prune layers=15,mlp=0.33 --data self:256 --steps 400 \\
        --draft-report --out smollm2-draft

The prompts are made from the built-in corpus, offline: instructions (explain, summarise,
continue, rewrite, ask) around its paragraphs, the calibration split's for training and the
evaluation split's for the report, so that the report's prompts are not the ones trained on.
"""

from __future__ import annotations

import statistics
from typing import Any

from tuili.data.corpus import builtin_text
from tuili.engine import LLM, SamplingParams
from tuili.engine.speculative import SpeculativeConfig
from tuili.models.model import Model

ASKS = (
    "Explain the following passage in simple words:\n\n{}",
    "Summarise this in two sentences:\n\n{}",
    "Continue this text for a few more sentences:\n\n{}",
    "Rewrite this paragraph more clearly:\n\n{}",
    "What questions could a student ask about this passage?\n\n{}",
)

OPEN = (
    "Explain how {} works.",
    "Why does {} matter?",
    "Give me three tips about {}.",
    "Write a short story that involves {}.",
    "Describe {} in simple terms.",
    "What are common mistakes people make with {}?",
    "Write a short, polite email about {}.",
    "Compare {} with something similar and say how they differ.",
)
TOPICS = (
    "a bicycle",
    "photosynthesis",
    "saving money",
    "the moon",
    "a job interview",
    "volcanoes",
    "learning to cook",
    "electric cars",
    "sleep",
    "the internet",
    "a birthday party",
    "recycling",
    "the human heart",
    "chess",
    "rainbows",
    "a city library",
    "time management",
    "earthquakes",
    "coffee",
    "public speaking",
    "bees",
    "solar panels",
    "writing a resume",
    "the ocean tides",
    "a family dinner",
    "vaccines",
    "gardening",
    "airplanes",
    "friendship",
    "the stock market",
    "a camping trip",
    "clouds",
    "running a marathon",
    "music lessons",
    "a museum visit",
    "batteries",
    "climate change",
    "a new puppy",
    "bread baking",
    "the Roman Empire",
)


def prompts(count: int, split: str = "calibration") -> list[list[dict[str, str]]]:
    """`count` chat requests from `split`, alternating: an instruction around a paragraph of the
    built-in corpus, and an open question on a topic (the two halves of `TOPICS` for the two splits),
    so a draft learns both how its target treats a text and how it chats."""
    paragraphs = [p.strip() for p in builtin_text(split).split("\n\n") if 200 < len(p.strip()) < 900]
    if not paragraphs:
        raise ValueError(f"the built-in {split} text has no paragraphs to make prompts from")
    topics = TOPICS[split == "evaluation" :: 2]
    asks = [ASKS[i % len(ASKS)].format(paragraphs[i % len(paragraphs)]) for i in range(count)]
    opens = [OPEN[i % len(OPEN)].format(topics[(i // len(OPEN) + i) % len(topics)]) for i in range(count)]
    return [[{"role": "user", "content": (asks if i % 2 == 0 else opens)[i // 2]}] for i in range(count)]


def self_outputs(target: Model, count: int, max_tokens: int = 192) -> str:
    """Training text for a draft: `count` conversations (prompt and the target's greedy answer,
    rendered with its chat template), one after another."""
    llm = LLM(target, prefix_caching=False)
    conversations = prompts(count, "calibration")
    done = llm.generate(conversations, SamplingParams(max_tokens=max_tokens, temperature=0))
    tokenizer = target.tokenizer
    texts = [
        tokenizer.apply_chat_template(
            [*c, {"role": "assistant", "content": d.outputs[0].text}], add_generation_prompt=False
        )
        for c, d in zip(conversations, done)
    ]
    return "\n".join(texts)


def draft_report(target: Model, draft: Model, count: int = 8, tokens: int = 4, rounds: int = 2) -> dict[str, Any]:
    """The draft's acceptance rate and batch-1 decode speed-up (greedy, 128 tokens, each prompt
    alone) on evaluation-split prompts, plain and speculative runs alternating."""
    tokenizer = target.tokenizer
    ids = [
        tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False)
        for c in prompts(count, "evaluation")
    ]
    plain = LLM(target, prefix_caching=False)
    spec = LLM(
        target,
        prefix_caching=False,
        speculative=SpeculativeConfig(method="draft", draft_model=draft, num_speculative_tokens=tokens),
    )
    return {"draft_tokens_a_step": tokens, **alternating(plain, spec, ids, rounds)}


def alternating(plain: LLM, spec: LLM, ids: list[list[int]], rounds: int, max_tokens: int = 128) -> dict[str, Any]:
    """Each prompt alone (greedy) through a plain and a speculative engine, rounds alternating which
    goes first: decode tokens/s of each (the median round), the speed-up, the speculator's acceptance
    and whether the outputs were identical."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    rates: dict[str, list[float]] = {"plain": [], "speculative": []}
    identical = True
    for r in range(rounds):
        outputs: dict[str, list] = {}
        for name, llm in [("plain", plain), ("speculative", spec)][:: 1 if r % 2 == 0 else -1]:
            done = [llm.generate([p], params)[0] for p in ids]
            made = [len(d.outputs[0].token_ids) - 1 for d in done]  # the first token is the prefill's
            seconds = sum(n / d.decode_tokens_per_second for n, d in zip(made, done) if d.decode_tokens_per_second)
            rates[name].append(sum(made) / seconds)
            outputs[name] = [d.outputs[0].token_ids for d in done]
        identical &= outputs["plain"] == outputs["speculative"]
    speculator = spec.engine.speculator
    assert speculator is not None
    return {
        "acceptance_rate": round(speculator.acceptance_rate, 3),
        "tokens_a_check": round(1 + speculator.accepted / max(1, speculator.steps), 2),
        "plain_tokens_per_second": round(statistics.median(rates["plain"]), 1),
        "speculative_tokens_per_second": round(statistics.median(rates["speculative"]), 1),
        "speed_up": round(statistics.median(s / p for s, p in zip(rates["speculative"], rates["plain"])), 2),
        "identical_to_plain": identical,
    }
