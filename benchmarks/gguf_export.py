"""GGUF export of the default model, checked in llama.cpp: one run.

Exports the float model (F16) and RTN-quantized ones whose format GGUF shares (W8 g32 -> Q8_0,
W4 g32 asymmetric -> Q4_1, W4 g32 symmetric -> Q4_0), then runs each file in llama.cpp
(llama-cpp-python, in its own venv: --llama-python) on the same 256 evaluation tokens as tuili,
and compares the next-token logits: largest difference, and how often the top token agrees; and
reads the file back with tuili (the `gguf` package's dequantization), which isolates the export
from llama.cpp's own arithmetic (it rounds activations to 8 bits against quantized weights).

    .venv/bin/python benchmarks/gguf_export.py --llama-python /tmp/llamavenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tuili.data import load_text
from tuili.models.loading import load
from tuili.pipeline.gguf_export import check_gguf, export_gguf
from tuili.pipeline.report import markdown_table
from tuili.quant import quantize_
from tuili.quant.config import Int4WeightOnly, Int8WeightOnly

RUNNER = """
import json, sys
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["gguf"], n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
llm.eval(a["ids"])
np.save(a["out"], np.asarray(llm.scores[: len(a["ids"])], dtype=np.float32))
"""

VARIANTS = {
    "float (F16)": None,
    "W8 g32 (Q8_0)": Int8WeightOnly(32),
    "W4 g32 asymmetric (Q4_1)": Int4WeightOnly(32),
    "W4 g32 symmetric (Q4_0)": Int4WeightOnly(32, symmetric=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme in VARIANTS.items():
            model = load("default")
            if scheme is not None:
                quantize_(model, scheme, progress=False)
            ids = model.tokenizer.encode(load_text("builtin", "evaluation"))[: args.tokens]
            start = time.perf_counter()
            written = export_gguf(model, Path(tmp) / "m.gguf")
            seconds = time.perf_counter() - start
            out = Path(tmp) / "scores.npy"
            subprocess.run(
                [args.llama_python, "-c", RUNNER, json.dumps({"gguf": str(written.path), "ids": ids, "out": str(out)})],
                check=True,
            )
            import numpy as np

            theirs = torch.from_numpy(np.load(out))
            with torch.no_grad():
                ours = model.module(torch.tensor([ids])).logits[0].float()
            agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(written.tensor_types.items()))
            read_back = check_gguf(written.path, model, torch.tensor([ids]))
            rows.append(
                [
                    name,
                    f"{written.path.stat().st_size / 2**20:.1f} MiB",
                    kinds,
                    f"{seconds:.1f} s",
                    f"{read_back:.3f}",
                    f"{(theirs - ours).abs().max().item():.3f}",
                    f"{ours.abs().max().item():.1f}",
                    f"{100 * agree:.1f}%",
                ]
            )
            print(
                markdown_table(
                    [
                        "model",
                        "GGUF file",
                        "tensors",
                        "export time",
                        "max |Δ logit|, file read by tuili",
                        "max |Δ logit| vs llama.cpp",
                        "max |logit|",
                        "top-1 agreement",
                    ],
                    rows,
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
