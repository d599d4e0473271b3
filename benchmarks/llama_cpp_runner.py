"""Runs inside a venv that has llama-cpp-python (not tuili's): the llama.cpp figures of engine.py.

    python llama_cpp_runner.py '{"gguf": PATH, "threads": 2, "short": [...], "long": [...],
                                 "mixed": [[...], ...], "new_tokens": 128, "repeats": 3}'

Prints one JSON object: decode and prefill tokens/s at batch 1, and the 16 mixed requests run one
after another (llama-cpp-python has no batching across requests; its server serialises them).
"""

import json
import sys
import time

from llama_cpp import Llama


def decode(llm, prompt, n):
    """Tokens/s after the first; `generate` does not stop at eos, so every run makes n tokens."""
    first, count = None, 0
    for _ in llm.generate(prompt, temp=0.0, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n:
            break
    return (n - 1) / (time.perf_counter() - first)


def main():
    a = json.loads(sys.argv[1])
    llm = Llama(
        model_path=a["gguf"],
        n_threads=a["threads"],
        n_threads_batch=a["threads"],
        n_ctx=2048,
        n_batch=512,
        verbose=False,
    )
    n, repeats = a["new_tokens"], a["repeats"]
    decode(llm, a["short"], 4)  # warm-up
    dec = max(decode(llm, a["short"], n) for _ in range(repeats))
    prefill = 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(a["long"])
        prefill = max(prefill, len(a["long"]) / (time.perf_counter() - start))
    start = time.perf_counter()
    for prompt in a["mixed"]:
        decode(llm, prompt, n)
    mixed = len(a["mixed"]) * n / (time.perf_counter() - start)
    import llama_cpp

    print(json.dumps({"decode": dec, "prefill": prefill, "mixed": mixed, "version": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
