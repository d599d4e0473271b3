"""`tuili generate` and `tuili chat`: streaming to the terminal."""

from __future__ import annotations

import sys
import time

from tuili.cli.common import (
    load_model,
    model_args,
    sampling_args,
    sampling_params,
)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt, streaming tokens to the terminal")
    p.add_argument("prompt")
    model_args(p)
    sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.set_defaults(run=_generate)

    p = sub.add_parser("chat", help="talk to the model, multi-turn (empty line or Ctrl-D ends)")
    model_args(p)
    sampling_args(p)
    p.add_argument("--system", help="a system message to start the conversation")
    p.set_defaults(run=_chat)


def _generate(args) -> None:
    from tuili.engine import LLM

    llm = LLM(load_model(args), max_num_seqs=1, kv_cache_dtype=args.kv_cache_dtype)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    _print_stream(llm, prompt, sampling_params(args))


def _chat(args) -> None:
    from tuili.engine import LLM

    llm = LLM(
        load_model(args), max_num_seqs=1, kv_cache_dtype=args.kv_cache_dtype
    )  # one engine: earlier turns stay cached
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = sampling_params(args)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return
        if not user.strip():
            return
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _print_stream(llm, messages, params)})


def _print_stream(llm, prompt, params) -> str:
    """Stream a completion to stdout; its speed to stderr. Returns the text."""
    start, first, pieces = time.perf_counter(), None, []
    for delta in llm.stream(prompt, params):
        first = first or time.perf_counter()
        pieces.append(delta)
        print(delta, end="", flush=True)
    print()
    stats = llm.engine.stats()
    if first is not None:
        print(
            f"[first text after {1000 * (first - start):.0f} ms, {time.perf_counter() - start:.1f} s in all; "
            f"prefix cache hit rate {stats['prefix_cache_hits'] / max(1, stats['prefix_cache_queries']):.0%}]",
            file=sys.stderr,
        )
    return "".join(pieces)
