"""Speculative decoding behind the server: streamed and whole responses are what the server without
it returns, several clients at once, and /metrics counts the drafts (under vLLM's names too)."""

from concurrent.futures import ThreadPoolExecutor

import openai
from helpers import random_tiny
from live import MODEL, live_server, samples

from tuili.engine.speculative import SpeculativeConfig
from tuili.server import ServerConfig

PROMPTS = ["abcabcabcabc", "the cat the cat the", "0123456789" * 3, "xyz"]


def answers(base: str) -> list[tuple[str, str]]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    def ask(prompt: str) -> tuple[str, str]:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
        parts = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True)
        return whole.choices[0].text, "".join(chunk.choices[0].text for chunk in parts)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, PROMPTS))


def test_speculative_server_answers_as_the_plain_one(tiny_model):
    with live_server(tiny_model, block_size=4) as (base, _):
        plain = answers(base)
    config = ServerConfig(model_names=(MODEL,), metrics_names="vllm")
    draft = random_tiny("llama-gqa", seed=5)
    for spec in (SpeculativeConfig(num_speculative_tokens=4), SpeculativeConfig(method="draft", draft_model=draft)):
        with live_server(tiny_model, config, block_size=4, speculative=spec) as (base, server):
            assert answers(base) == plain
            assert all(whole == streamed for whole, streamed in plain)
            stats = server.llm.engine.stats()
            assert stats["spec_draft_tokens"] > 0
            counted = samples(base)[f'vllm:spec_decode_num_draft_tokens_total{{model_name="{MODEL}"}}']
            assert counted == stats["spec_draft_tokens"]
