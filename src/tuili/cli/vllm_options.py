"""vLLM's spellings of `tuili serve` options, so that a `vllm serve` launch line runs unchanged where
tuili has the feature, and fails at once, saying what to use, where it does not.

Options tuili honours under vLLM's names: --max-model-len, --chat-template, --seed,
--generation-config vllm, --allowed-origins / --allowed-methods / --allowed-headers /
--allow-credentials (CORS), --ssl-keyfile / --ssl-certfile, --block-size,
--enable-prefix-caching / --no-enable-prefix-caching, --uvicorn-log-level, --tool-call-parser
(hermes, llama3_json), speculative decoding (--speculative-config's ngram and draft-model
methods, and the older --speculative-model / --num-speculative-tokens / --ngram-prompt-lookup-*
flags), and the flags that change nothing on tuili's CPU engine (--trust-remote-code:
tuili never runs a model's own code; --enforce-eager: there are no CUDA graphs;
--enable-auto-tool-choice: tool_choice "auto" is always allowed; --disable-log-requests,
--disable-log-stats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuili.engine.speculative import SpeculativeConfig
from tuili.engine.tools import ToolFormat

# vLLM options for features tuili does not have: the option, and what to do instead
LACKING = {
    "--tensor-parallel-size": "tuili runs one process on the CPU; remove the option (scale out with replicas)",
    "--pipeline-parallel-size": "tuili runs one process on the CPU; remove the option (scale out with replicas)",
    "--quantization": "tuili reads a checkpoint's quantization from its folder; quantize with `tuili quantize`",
    "--gpu-memory-utilization": "tuili's KV cache is sized by --kv-cache-gb (CPU memory)",
    "--enable-lora": "LoRA adapters are not supported by tuili serve; merge them into the model first",
    "--lora-modules": "LoRA adapters are not supported by tuili serve; merge them into the model first",
}
UNCHANGED = (
    "--trust-remote-code",
    "--enforce-eager",
    "--disable-log-requests",
    "--disable-log-stats",
    "--enable-auto-tool-choice",  # tuili always allows tool_choice "auto"
)


def add(p: argparse.ArgumentParser) -> None:
    """vLLM's option names on `tuili serve`'s parser."""
    p.add_argument(
        "--max-model-len", type=int, help="the longest prompt + completion served (default: the model's context)"
    )
    p.add_argument(
        "--chat-template", help="a Jinja chat template, or the path of a file holding one (default: the model's)"
    )
    p.add_argument("--seed", type=int, help="seeds requests that send no seed, so a server's output is reproducible")
    p.add_argument(
        "--generation-config",
        default="vllm",
        help="'vllm' (the default here): OpenAI's sampling defaults; tuili does not read a model's generation config",
    )
    p.add_argument("--allowed-origins", help="CORS: a JSON list of origins, such as '[\"*\"]' (default: no CORS)")
    p.add_argument("--allowed-methods", default='["*"]', help="CORS: a JSON list of methods")
    p.add_argument("--allowed-headers", default='["*"]', help="CORS: a JSON list of headers")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--ssl-keyfile", help="serve HTTPS with this key (and --ssl-certfile)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (and --ssl-keyfile)")
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(ToolFormat.formats),
        help="how the model writes tool calls: hermes (Hermes, Qwen) or llama3_json (default: from the chat template)",
    )
    p.add_argument(
        "--speculative-config",
        help='speculative decoding as vLLM takes it: JSON such as \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        'or \'{"model": "DRAFT", "num_speculative_tokens": 4}\'',
    )
    p.add_argument(
        "--speculative-model", help="'ngram' (prompt lookup: no model), or a draft model tuili loads (same tokenizer)"
    )
    p.add_argument("--num-speculative-tokens", type=int, help="draft tokens checked per step (default 4)")
    p.add_argument("--ngram-prompt-lookup-max", type=int, help="longest n-gram prompt lookup matches (default 4)")
    p.add_argument("--ngram-prompt-lookup-min", type=int, help="shortest n-gram prompt lookup matches (default 1)")
    p.add_argument(
        "--speculative-disable-by-batch-size",
        type=int,
        help="speculate only while at most this many requests decode (default 4)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--uvicorn-log-level", choices=["debug", "info", "warning", "error"], help="the same as --log-level")
    p.add_argument(
        "--metrics-names",
        choices=["tuili", "vllm"],
        default="tuili",
        help="'vllm': /metrics under vLLM's names (vllm:..., with a model_name label) for its dashboards",
    )
    for flag in UNCHANGED:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in LACKING:
        p.add_argument(flag, nargs="?", const=True, help=argparse.SUPPRESS)


def check(args: argparse.Namespace) -> None:
    """Refuse, with what to do instead, a vLLM option for a feature tuili lacks (ValueError)."""
    for flag, instead in LACKING.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not (flag.endswith("parallel-size") and str(value) == "1"):
            raise ValueError(f"{flag}: {instead}")
    if args.generation_config != "vllm":
        raise ValueError(
            f"--generation-config {args.generation_config}: tuili serve does not take sampling defaults from a "
            "model's generation config; pass --generation-config vllm (OpenAI's defaults) or send them in requests"
        )
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len must be positive, got {args.max_model_len}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: give both")
    if args.uvicorn_log_level:
        args.log_level = args.uvicorn_log_level


def cors(args: argparse.Namespace) -> dict | None:
    """CORSMiddleware's options from vLLM's JSON lists (None without --allowed-origins)."""
    if args.allowed_origins is None:
        return None
    options = {}
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        try:
            value = json.loads(getattr(args, name))
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"--{name.replace('_', '-')} takes a JSON list of strings, such as '[\"*\"]'")
        options[name.replace("allowed_", "allow_")] = value
    return {**options, "allow_credentials": args.allow_credentials}


def chat_template(value: str | None) -> str | None:
    """The template text: the option's value, or the file it names."""
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


# --speculative-config keys, and SpeculativeConfig's name for each
_SPECULATIVE_KEYS = {
    "method": "method",
    "model": "draft_model",
    "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_max": "prompt_lookup_max",
    "prompt_lookup_min": "prompt_lookup_min",
    "disable_by_batch_size": "max_batch",
}
_SPECULATIVE_METHODS = {"ngram": "ngram", "draft_model": "draft", "draft": "draft"}


def speculative(args: argparse.Namespace) -> SpeculativeConfig | None:
    """Speculative decoding from vLLM's --speculative-config JSON or its older flags (None: off);
    ValueError, saying what to change, for a method or key tuili does not have."""
    options: dict = {}
    if args.speculative_config:
        try:
            given = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("--speculative-config takes a JSON object")
        unknown = sorted(set(given) - set(_SPECULATIVE_KEYS))
        if unknown:
            raise ValueError(
                f"--speculative-config: tuili does not take {', '.join(unknown)}; "
                f"it takes {', '.join(_SPECULATIVE_KEYS)}"
            )
        options = {_SPECULATIVE_KEYS[k]: v for k, v in given.items()}
        method = options.get("method", "draft_model" if "draft_model" in options else None)
        if method not in _SPECULATIVE_METHODS:
            raise ValueError(
                f"--speculative-config: method {method!r} is not one tuili has; use 'ngram' (prompt lookup) "
                "or give a draft 'model'"
            )
        options["method"] = _SPECULATIVE_METHODS[method]
    if args.speculative_model:
        if options:
            raise ValueError("give --speculative-config or --speculative-model, not both")
        ngram = args.speculative_model.strip("[]") == "ngram"
        options = {"method": "ngram"} if ngram else {"method": "draft", "draft_model": args.speculative_model}
    flags = {
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": args.ngram_prompt_lookup_max,
        "prompt_lookup_min": args.ngram_prompt_lookup_min,
        "max_batch": args.speculative_disable_by_batch_size,
    }
    given_flags = {k: v for k, v in flags.items() if v is not None}
    if given_flags and not options:
        raise ValueError("speculative options need a method: --speculative-model ngram, or a draft model")
    return SpeculativeConfig(**{**options, **given_flags}) if options else None
