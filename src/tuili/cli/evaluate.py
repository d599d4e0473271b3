"""`tuili eval` (perplexity, or lm-evaluation-harness tasks in this process) and `tuili analyze`
(sizes, FLOPs, memory)."""

from __future__ import annotations

import json

from tuili.cli.common import (
    data_args,
    load_model,
    model_args,
)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity over token windows, or lm-evaluation-harness tasks (--tasks)")
    model_args(p)
    data_args(p, max_tokens=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (run in this process; no server)")
    p.add_argument("--include-path", help="a folder of task YAML files of your own (with --tasks)")
    p.add_argument("--limit", type=float, help="documents per task, or a fraction of them (with --tasks)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (with --tasks)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts as chats (with --tasks)")
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
    if args.tasks:
        return _tasks(args, model)
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


def _tasks(args, model) -> None:
    """lm-evaluation-harness's tasks on the loaded model, through tuili's engine in this process."""
    from lm_eval.utils import make_table

    from tuili.pipeline.harness import evaluate

    options = {"apply_chat_template": args.apply_chat_template}
    if args.num_fewshot is not None:
        options["num_fewshot"] = args.num_fewshot
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(model, tasks, args.include_path, args.limit, **options)
    if args.json:
        print(json.dumps(results["results"], indent=2, default=str))
        return
    print(make_table(results))
