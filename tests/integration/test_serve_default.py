"""The real default model behind the server, through the official openai client."""

import numpy as np
import openai
import pytest
from live import live_server

from tuili.server import ServerConfig

pytestmark = pytest.mark.integration


def test_chat_answers_and_streams_like_the_engine(default_model):
    with live_server(default_model, ServerConfig(model_names=("smollm2",))) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=True
            )
        )
        assert streamed == reply.choices[0].message.content
        cached = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        assert cached.usage.prompt_tokens_details.cached_tokens > 0  # the prompt's blocks came from the prefix cache
        similar = client.embeddings.create(
            model="smollm2",
            input=["the cat sat on the mat", "a cat was sitting on a mat", "quarterly revenue grew by 4%"],
        )
        a, b, c = (np.array(d.embedding) for d in similar.data)
        assert a @ b > a @ c  # paraphrases are closer than unrelated text
