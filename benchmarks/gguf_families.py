"""GGUF export of every family at its published shapes, checked in llama.cpp: one run.

For each family of tests/published.py (two decoder layers, one for Mixtral, whose layer holds 1.4B
weights; a 32,000-entry vocabulary), random weights (std 0.02, norms near 1) are exported as F16 and
as W4 g32 symmetric (Q4_0), then run in llama.cpp (llama-cpp-python, in its own venv:
--llama-python) and read back by tuili, on the same 64 random tokens; the table gives the largest
logit difference against tuili and how often the top token agrees.

    .venv/bin/python benchmarks/gguf_families.py --llama-python /tmp/llamavenv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernels.py shadows `kernels`
sys.path.insert(0, str(HERE.parent / "tests"))

from published import PUBLISHED, reduced  # noqa: E402

from tuili.models import LlamaConfig, LlamaForCausalLM, Model  # noqa: E402
from tuili.pipeline.gguf_export import check_gguf, export_gguf  # noqa: E402
from tuili.pipeline.report import markdown_table  # noqa: E402
from tuili.quant import Int4WeightOnly, quantize_  # noqa: E402

VOCAB, TOKENS = 32000, 64
LAYERS = {"Mixtral-8x7B": 1}
RUNNER = """
import json, sys
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["gguf"], n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2)
llm.eval(a["ids"])
np.save(a["out"], np.asarray(llm.scores[: len(a["ids"])], dtype=np.float32))
"""


def _tokenizer(vocab: int):
    spec = importlib.util.spec_from_file_location("scale", HERE / "scale.py")
    assert spec is not None and spec.loader is not None
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale.tokenizer(vocab)


def random_model(name: str, tokenizer) -> Model:
    config = LlamaConfig.from_hf(reduced(name, layers=LAYERS.get(name, 2), vocab=VOCAB))
    torch.manual_seed(0)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for key, p in module.named_parameters():
            p.normal_(1.0 if "norm" in key else 0.0, 0.1 if "norm" in key else 0.02)
    return Model(module, tokenizer, config, f"random:{name}")


def llama_cpp_logits(python: str, gguf: Path, ids: list[int], out: Path) -> torch.Tensor:
    subprocess.run([python, "-c", RUNNER, json.dumps({"gguf": str(gguf), "ids": ids, "out": str(out)})], check=True)
    return torch.from_numpy(np.load(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--families", nargs="*", default=sorted(PUBLISHED))
    args = parser.parse_args()
    tokenizer = _tokenizer(VOCAB)
    ids = torch.randint(3, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    for name in args.families:
        for label, scheme in (("F16", None), ("Q4_0", Int4WeightOnly(32, symmetric=True))):
            model = random_model(name, tokenizer)
            if scheme is not None:
                quantize_(model, scheme, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                written = export_gguf(model, Path(tmp) / "m.gguf", check=False)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    ours = model.module(torch.tensor([ids])).logits[0].float()
                theirs = llama_cpp_logits(args.llama_python, written.path, ids, Path(tmp) / "scores.npy")
                read_back = check_gguf(written.path, model, torch.tensor([ids]))
                size = written.path.stat().st_size / 2**20
            agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(written.tensor_types.items()))
            rows.append(
                [
                    name,
                    str(model.config.num_hidden_layers),
                    label,
                    f"{size:.0f} MiB",
                    kinds,
                    f"{seconds:.1f} s",
                    f"{read_back:.1e}",
                    f"{(theirs - ours).abs().max().item():.1e}",
                    f"{ours.abs().max().item():.2f}",
                    f"{100 * agree:.0f}%",
                ]
            )
            del model
            head = ["family", "layers", "weights", "file", "tensors", "export", "Δ read by tuili", "Δ llama.cpp"]
            print(markdown_table([*head, "max |logit|", "top-1 agreement"], rows), flush=True)


if __name__ == "__main__":
    main()
