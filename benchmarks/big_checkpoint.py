"""An 8B checkpoint quantized in bounded memory, then served: peak resident memory and time.

    .venv/bin/python benchmarks/big_checkpoint.py [--layers 32] [--calib-samples 16]
        [--calib-len 256] [--work /tmp/tuili-8b]

A random-weight checkpoint at Llama-3-8B's published shape (hidden 4096, 32 layers, 32/8 heads,
FFN 14336, vocab 128256, untied head; 8.0B parameters) is written once in bf16 as the hub stores
it: 5 GB safetensors shards and an index, generated one shard at a time. `tuili quantize` (what
a user runs) then quantizes it W4A16 with GPTQ, reading one decoder layer at a time (the CLI
loads lazily), and writes the result in shards. Its peak resident memory (the kernel's high-water
mark of the process) is compared with the bound: 1.5 × the largest bf16 shard plus the
quantized output's bytes. The output is then loaded and served: batch-1 decode through
`LLM.generate`, with the serving process's resident memory beside the weight bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = dict(  # Llama-3-8B
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale", HERE / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(folder: Path, layers: int) -> Path:
    """The random bf16 checkpoint, written shard by shard (never the whole model in memory)."""
    if (folder / "config.json").is_file():
        return folder

    from tuili.models import LlamaConfig, LlamaForCausalLM
    from tuili.models.checkpoint import ShardWriter
    from tuili.models.io import atomic_folder, write_json

    config = LlamaConfig.from_hf({**SHAPE, "num_hidden_layers": layers})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    with atomic_folder(folder) as tmp:
        g = torch.Generator().manual_seed(0)
        writer = ShardWriter(tmp)  # each shard written once full: never the whole model in memory
        for name, shape in shapes.items():
            writer.add({name: _random(name, shape, g)})
        print(f"wrote {len(writer.close())} shards", file=sys.stderr, flush=True)
        hf = config.to_hf()
        hf["torch_dtype"] = "bfloat16"
        write_json(tmp / "config.json", hf)
        _scale_module().tokenizer(config.vocab_size).save(tmp)
    return folder


def _random(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def measured(cmd: list[str]) -> tuple[dict, float, float]:
    """Run `cmd` in a fresh process (itself run by a fresh Python, so that the high-water mark is
    its own): (its JSON output, seconds, peak resident GiB)."""
    wrapper = [sys.executable, __file__, "--measure", "--", *cmd]
    start = time.perf_counter()
    out = subprocess.run(wrapper, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(out.stderr[-4000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["output"], seconds, result["peak_kib"] / 2**20


def measure(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    output = json.loads(proc.stdout[proc.stdout.index("{") :])  # the command's --json output
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, this wrapper's one child
    print(json.dumps({"output": output, "peak_kib": peak}))


def serve(folder: str, tokens: int) -> None:
    """Load the quantized folder and decode at batch 1; print speed and resident memory."""
    import tuili
    from tuili.pipeline.analysis import analyze

    model = tuili.load(folder, dtype="bfloat16")
    llm = tuili.LLM(model, max_num_seqs=1)
    prompt = list(range(3, 19))
    params = tuili.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt], tuili.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    seconds = time.perf_counter() - start
    now_mib, _ = _scale_module().resident()  # scale.py reads /proc/self/status the same way
    print(
        json.dumps(
            {
                "decode_tok_s": len(out.token_ids) / seconds,
                "weight_bytes": analyze(model).num_bytes,
                "resident_gib": now_mib / 1024,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: the whole 8B model)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16, help="tokens decoded when serving the result")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuili-8b"))
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.cmd)
    if args.serve:
        return serve(args.serve, args.tokens)

    folder = write_checkpoint(args.work / f"llama3-8b-{args.layers}l", args.layers)
    shards = sorted(folder.glob("*.safetensors"))
    params = sum(p.stat().st_size for p in shards) / 2
    out = args.work / f"llama3-8b-{args.layers}l-w4a16-gptq"
    quantize = [
        *(sys.executable, "-m", "tuili", "quantize", "--model", str(folder), "--dtype", "bfloat16"),
        *("--scheme", "w4a16", "--method", "gptq", "--out", str(out), "--json"),
        *("--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)),
    ]
    result, seconds, peak = measured(quantize)
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    bound = (1.5 * largest + written) / 2**30
    served, _, serve_peak = measured([sys.executable, __file__, "--serve", str(out), "--tokens", str(args.tokens)])

    print(f"\n## {params / 1e9:.2f}B-parameter Llama-3-shaped checkpoint ({len(shards)} bf16 shards), W4A16 GPTQ\n")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; calibration {args.calib_samples} × {args.calib_len} tokens\n")
    print("| step | time | peak resident | bound: 1.5 × largest shard + output | weights |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| `tuili quantize` (lazy, layer by layer) | {seconds / 60:.1f} min | {peak:.2f} GiB | "
        f"{bound:.2f} GiB (1.5 × {largest / 2**30:.2f} + {written / 2**30:.2f}) | "
        f"{result.get('bytes_before', 0) / 2**30:.2f} → {written / 2**30:.2f} GiB on disk |"
    )
    print(
        f"| serve the result (bf16 activations), batch-1 decode {served['decode_tok_s']:.2f} tok/s | | "
        f"{serve_peak:.2f} GiB (now {served['resident_gib']:.2f}) | | {served['weight_bytes'] / 2**30:.2f} GiB |"
    )
    print(f"\npeak within bound: {'yes' if peak <= bound else 'NO'}")


if __name__ == "__main__":
    main()
