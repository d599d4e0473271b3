"""`Model`: the module, its tokenizer, its config and where it came from; `save` writes an HF folder."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuili.models.checkpoint import SHARD_BYTES, ShardWriter
from tuili.models.config import LlamaConfig
from tuili.models.families import checkpoint_name, to_stored
from tuili.models.formats import FORMATS, CheckpointFormat, format_of
from tuili.models.io import atomic_folder, write_json
from tuili.models.lazy import onload_all
from tuili.models.llama import LlamaForCausalLM
from tuili.models.tokenizer import Tokenizer

PROVENANCE_FILE = "tuili.json"


@dataclass
class Model:
    """A loaded language model. `provenance` lists where it came from and what was done to it."""

    module: LlamaForCausalLM
    tokenizer: Tokenizer
    config: LlamaConfig
    source: str
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a generation: the config's eos ids and the tokenizer's eos token."""
        ids = self.config.eos_token_id
        ids = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def stored_name(self, name: str) -> str:
        """The name a module of this model is stored under (a Phi-3 q_proj: its layer's qkv_proj)."""
        return checkpoint_name(name, self.config)

    def record(self, step: str, **details: Any) -> None:
        """Append a step (loaded, quantized, pruned ...) to the provenance saved with the model."""
        self.provenance.append({"step": step, "time": _now(), **details})

    def save(self, folder: str | Path, max_shard_bytes: int = SHARD_BYTES) -> Path:
        """Write a Hugging Face folder (safetensors, config.json, tokenizer) atomically; return its path.
        Weights above `max_shard_bytes` are split into shards with an index. Compressed layers are
        converted to their format one decoder layer at a time, each shard written once full, so
        saving needs about one shard's memory beyond the model's own.

        transformers' AutoModelForCausalLM loads it, and `tuili.load` reads it back bit-exactly.
        """
        onload_all(self.module)  # a lazily loaded model's layers no verb has reached yet
        with atomic_folder(Path(folder)) as tmp:
            config = self.config.to_hf()
            method = format_of(self.module)
            fmt = None if method is None else FORMATS[method]
            if fmt is not None:
                assert fmt.save_config is not None  # layers name a format tuili writes
                config["quantization_config"] = fmt.save_config(self.module, self.stored_name)
            elif (sparsity := _sparsity_config(self)) is not None:
                # stored dense, described as compressed-tensors does (llm-compressor)
                config["quantization_config"] = {
                    "quant_method": "compressed-tensors",
                    "format": "dense",
                    "quantization_status": "compressed",
                    "config_groups": {},
                    "sparsity_config": sparsity,
                }
            writer = ShardWriter(tmp, max_shard_bytes)
            for part in self._stored_parts(fmt):
                if self.config.tie_word_embeddings and "model.embed_tokens.weight" in part:
                    head = part.get("lm_head.weight")
                    if (
                        head is not None
                        and head.dtype == self.module.dtype
                        and torch.equal(head, part["model.embed_tokens.weight"])
                    ):
                        del part["lm_head.weight"]  # stored once, as the embedding
                    else:  # the head was compressed apart from the embedding: no longer tied on disk
                        config["tie_word_embeddings"] = False
                writer.add(part)
            writer.close()
            config["torch_dtype"] = str(self.module.dtype).removeprefix("torch.")
            write_json(tmp / "config.json", config)
            write_json(tmp / "generation_config.json", _generation_config(self))
            self.tokenizer.save(tmp)
            write_json(
                tmp / PROVENANCE_FILE,
                {"provenance": self.provenance + [{"step": "saved", "time": _now(), "torch": torch.__version__}]},
            )
        return Path(folder).absolute()

    def _stored_parts(self, fmt: CheckpointFormat | None) -> Iterator[dict[str, torch.Tensor]]:
        """The checkpoint's tensors as stored, in parts: everything outside the decoder layers (the
        embedding and the head together, so that their tie can be checked), then one decoder
        layer at a time. Compressed layers are converted by `fmt` as their part is reached."""
        state = self.module.state_dict()  # references to the module's tensors, not copies
        compressed = {n: m for n, m in self.module.named_modules() if hasattr(m, "quant_method")}
        parts: dict[str, list[str]] = {}
        for key in state:
            match = _LAYER_KEY.match(key)
            parts.setdefault(match.group(0) if match else "", []).append(key)
        owner = lambda key: key.rpartition(".")[0]  # noqa: E731 (the module a tensor belongs to)
        for prefix, keys in parts.items():
            part = {k: state[k] for k in keys if owner(k) not in compressed or k.endswith(".bias")}
            for name in dict.fromkeys(owner(k) for k in keys if owner(k) in compressed):
                assert fmt is not None and fmt.save_layer is not None
                part.update({f"{name}.{k}": v for k, v in fmt.save_layer(compressed[name], self.module.dtype).items()})
            embed = self.module.model.embed_tokens
            if not prefix and "model.embed_tokens.weight" not in part and hasattr(embed, "table"):
                part["model.embed_tokens.weight"] = embed.table()  # an embedding that reads the head's codes
            yield {k: v.detach().contiguous() for k, v in to_stored(part, self.config).items()}


_LAYER_KEY = re.compile(r"model\.layers\.\d+\.")


def _sparsity_config(model: Model) -> dict[str, Any] | None:
    """compressed-tensors' sparsity_config (dense format) for a model whose linear layers carry
    pruning masks (`weight_mask`, set by tuili.prune); None if none does."""
    linears = {n: m for n, m in model.module.named_modules() if isinstance(m, torch.nn.Linear)}
    masked = {n: m for n, m in linears.items() if hasattr(m, "weight_mask")}
    if not masked:
        return None
    zeros = sum(int((m.weight == 0).sum()) for m in masked.values())
    total = sum(m.weight.numel() for m in masked.values())
    structures = [step["sparsity_structure"] for step in model.provenance if "sparsity_structure" in step]
    structure = structures[-1] if structures else "unstructured"
    return {
        "format": "dense",
        "global_sparsity": round(zeros / total, 6),
        "sparsity_structure": structure,
        "targets": sorted({model.stored_name(n) for n in masked}),
        "ignore": sorted({model.stored_name(n) for n in linears} - {model.stored_name(n) for n in masked}),
    }


def _generation_config(model: Model) -> dict[str, Any]:
    eos = sorted(model.eos_token_ids)
    return {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": model.config.pad_token_id,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
