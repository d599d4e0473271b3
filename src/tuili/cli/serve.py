"""`tuili serve`: the OpenAI-compatible server, in this process or as Ray Serve replicas (--ray)."""

from __future__ import annotations

import argparse
import os
import sys

from tuili.cli import ray_options, vllm_options
from tuili.cli.common import model_args
from tuili.engine.pacing import DEFAULT_TARGET_ITL


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, embeddings, metrics)")
    arguments(p)
    p.set_defaults(run=_serve)


def options(argv: list[str]) -> argparse.Namespace:
    """`tuili serve`'s options from an argument list, checked (what `serve run` configs give)."""
    p = argparse.ArgumentParser(prog="tuili serve", exit_on_error=False)
    arguments(p)
    try:
        args = p.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"tuili serve options {argv}: {e}") from None
    check(args)
    return args


def arguments(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        action="extend",
        nargs="+",
        default=[],
        help="names clients send as 'model' (several, or the option repeated; default: the --model spec)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TUILI_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TUILI_API_KEY; none if unset)",
    )
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoding together")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument(
        "--target-itl-ms",
        type=float,
        default=DEFAULT_TARGET_ITL * 1000,
        help="the latency/throughput knob: milliseconds a step should take while requests decode; prompt "
        "chunks beside the decodes are sized to keep within it (0: no pacing, full steps, throughput first)",
    )
    p.add_argument(
        "--max-queue-seconds",
        type=float,
        default=0.0,
        help="seconds a request may wait for a place in the running batch; past it, 503 with Retry-After, so "
        "time to first token stays bounded under overload (0: no limit)",
    )
    p.add_argument("--kv-cache-gb", type=float, help="KV-cache memory (default: 2,048 tokens per sequence)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "bfloat16", "int8"),
        default="auto",
        help="what the KV cache stores (auto: the model's choice, saved by a recipe's kv_cache, else its dtype)",
    )
    p.add_argument("--max-prompt-tokens", type=int, help="refuse longer prompts (400)")
    p.add_argument("--max-tokens", type=int, help="refuse requests asking for more tokens (400)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="refuse larger request bodies (413)")
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="sequences running or waiting at once; beyond it 429 with Retry-After",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a generation may run before it is stopped (504; 0: no limit)",
    )
    p.add_argument("--no-warmup", action="store_true", help="report ready at once (the first requests are slower)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    vllm_options.add(p)
    ray_options.add(p)


def check(args: argparse.Namespace) -> None:
    """ValueError, naming the option, for values `tuili serve` cannot honour."""
    for name, value in (
        ("--port", args.port),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-queued-requests", args.max_queued_requests),
    ):
        if value < (0 if name == "--port" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value, zero in (
        ("--target-itl-ms", args.target_itl_ms, "0 (no pacing) or a number of milliseconds"),
        ("--max-queue-seconds", args.max_queue_seconds, "0 (no limit) or a number of seconds"),
        ("--request-timeout", args.request_timeout, "0 (no limit) or a number of seconds"),
    ):
        if not value >= 0:  # NaN too
            raise ValueError(f"{name} must be {zero}, got {value}")
    vllm_options.check(args)
    ray_options.check(args)


def parts(args: argparse.Namespace):
    """The server the options describe, as `ServerParts` (nothing loaded yet)."""
    from tuili.server import ServerConfig, ServerParts

    config = ServerConfig(
        model_names=tuple(args.served_model_name) or (args.model,),
        max_model_len=args.max_model_len,
        cors=vllm_options.cors(args),
        metrics_names=args.metrics_names,
        tool_call_parser=args.tool_call_parser,
        api_key=args.api_key or None,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_queued_requests=args.max_queued_requests,
        warmup=not args.no_warmup,
        request_timeout=args.request_timeout or None,
    )
    engine = dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        target_itl=args.target_itl_ms / 1000 or None,
        max_queue_time=args.max_queue_seconds or None,
        kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)) if args.kv_cache_gb else None,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        speculative=vllm_options.speculative(args),
    )
    template = vllm_options.chat_template(args.chat_template)
    return ServerParts(args.model, config, engine, args.dtype, args.keep_quantized, args.threads, template)


def ray_app(config: dict):
    """`serve run`'s application builder (`import_path: tuili.cli.serve:ray_app`): its `args` hold
    `options`, a list of `tuili serve` options (see docs/ray.md); the config file's `deployments`
    section may override the replica counts and resources they set."""
    from tuili.server.ray import application

    unknown = sorted(set(config) - {"options"})
    if unknown:
        raise ValueError(f"tuili's serve config takes 'options' (a list of tuili serve options), not {unknown}")
    given = config.get("options", [])
    if not isinstance(given, list) or not all(isinstance(o, str | int | float) for o in given):
        raise ValueError("'options' is a list of tuili serve options, such as ['--model', 'default']")
    args = options(["--ray", *map(str, given)])
    return application(parts(args), ray_options.replicas(args))


def _serve(args) -> int:
    check(args)
    if args.ray:
        from tuili.server.ray.cluster import run

        ssl = (args.ssl_keyfile, args.ssl_certfile) if args.ssl_keyfile else None
        return run(parts(args), ray_options.replicas(args), args.host, args.port, args.ray_address, ssl, args.log_level)
    from tuili.server import serve
    from tuili.server.serve import configure_logging

    configure_logging(args.log_level)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    server = parts(args).build()
    ssl = {"ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile} if args.ssl_keyfile else {}
    return serve(server, args.host, args.port, args.grace, args.log_level, **ssl)
