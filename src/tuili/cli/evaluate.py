"""`tuili eval` (perplexity) and `tuili analyze` (sizes, FLOPs, memory)."""

from __future__ import annotations

import json

from tuili.cli.common import (
    data_args,
    load_model,
    model_args,
)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity over non-overlapping token windows")
    model_args(p)
    data_args(p, max_tokens=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("analyze", help="parameters, bytes, FLOPs per token and memory")
    model_args(p)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_analyze)


def _eval(args) -> None:
    from tuili.data import eval_windows, load_text, perplexity

    model = load_model(args)
    windows = eval_windows(model.tokenizer.encode(load_text(args.data, "evaluation")), args.seq_len, args.max_tokens)
    result = perplexity(model.module, windows, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": model.source, "data": args.data, **result.to_dict()}, indent=2))
        return
    print(
        f"perplexity {result.perplexity:.4f} over {result.num_tokens:,} tokens "
        f"({result.num_windows} windows of {result.seq_len}) in {result.seconds:.1f} s, "
        f"{result.tokens_per_second:.0f} tokens/s"
    )


def _analyze(args) -> None:
    from tuili.pipeline.analysis import analysis_markdown, analyze

    result = analyze(load_model(args), context_len=args.context_len, batch_size=args.batch_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else analysis_markdown(result))
