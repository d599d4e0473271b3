"""Lazy loading (decoder layers read when first used) and sharded checkpoints, in and out."""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from helpers import save_hf_tiny

import tuili
from tuili.errors import ModelFormatError
from tuili.models.lazy import LazyLayers
from tuili.pipeline.analysis import analyze
from tuili.prune import Wanda, prune_
from tuili.quant import AWQ, GPTQ, RTN, Int4WeightOnly, Int8DynamicActivation, Int8WeightOnly, SmoothQuant, quantize_

CALIB = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))


def sharded(name, folder):
    """A tiny model of family `name` saved by transformers in many small shards with an index."""
    hf = save_hf_tiny(name, folder)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    hf.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def same_state(a, b) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["llama-gqa", "phi3", "gemma2", "mixtral"])
def test_lazy_model_reads_layers_as_used_and_equals_the_eager_one(name, tmp_path):
    folder = sharded(name, tmp_path / name)
    eager, lazy = tuili.load(folder), tuili.load(folder, lazy=True)
    assert sorted(lazy.module.lazy_layers.pending) == list(range(eager.config.num_hidden_layers))
    assert all(p.is_meta for layer in lazy.module.model.layers for p in layer.parameters())
    assert not lazy.module.model.embed_tokens.weight.is_meta
    assert analyze(lazy).num_bytes == analyze(eager).num_bytes  # sizes known before reading
    ids = torch.randint(0, 200, (2, 12))
    assert torch.equal(lazy.module(ids).logits, eager.module(ids).logits)  # a forward reads every layer
    assert not lazy.module.lazy_layers.pending and lazy.provenance[-1]["lazy"]

    lazy = tuili.load(folder, lazy=True)
    scheme, method = Int4WeightOnly(group_size=32), GPTQ()
    quantize_(eager, scheme, method, calib=CALIB, progress=False)
    quantize_(lazy, scheme, method, calib=CALIB, progress=False)
    assert same_state(lazy, eager)


@pytest.mark.parametrize(
    "scheme,method",
    [
        (Int8WeightOnly(), RTN()),
        (Int4WeightOnly(group_size=32), AWQ()),
        (Int8DynamicActivation(), SmoothQuant()),
    ],
)
def test_every_method_quantizes_a_lazy_model_as_an_eager_one(scheme, method, tmp_path):
    folder = sharded("llama-gqa", tmp_path / "m")
    eager, lazy = tuili.load(folder), tuili.load(folder, lazy=True)
    quantize_(eager, scheme, method, calib=CALIB, progress=False)
    quantize_(lazy, scheme, method, calib=CALIB, progress=False)
    assert same_state(lazy, eager)


@pytest.mark.parametrize("method", [RTN(), GPTQ()])
def test_quantizing_holds_one_float_decoder_layer_at_a_time(method, tmp_path, monkeypatch):
    """When layer i is read, every float weight of the layers before it has been freed."""
    folder = sharded("llama-gqa", tmp_path / "m")
    model = tuili.load(folder, lazy=True)
    read = LazyLayers.onload
    alive: list[list[weakref.ref]] = []
    live_when_read: list[int] = []

    def watched(self, module, i):
        if i in self.pending:
            gc.collect()
            live_when_read.append(sum(r() is not None for refs in alive for r in refs))
            read(self, module, i)
            layer = module.model.layers[i]
            alive.append([weakref.ref(m.weight) for m in layer.modules() if isinstance(m, torch.nn.Linear)])

    monkeypatch.setattr(LazyLayers, "onload", watched)
    quantize_(model, Int4WeightOnly(group_size=32), method, calib=CALIB, progress=False)
    assert live_when_read == [0] * model.config.num_hidden_layers
    gc.collect()
    assert all(r() is None for refs in alive for r in refs)


def test_wanda_prunes_a_lazy_model_as_an_eager_one(tmp_path):
    folder = sharded("llama-gqa", tmp_path / "m")
    eager, lazy = tuili.load(folder), tuili.load(folder, lazy=True)
    prune_(eager, 0.5, Wanda(), calib=CALIB, progress=False)
    prune_(lazy, 0.5, Wanda(), calib=CALIB, progress=False)
    assert same_state(lazy, eager)


def test_saving_and_serving_read_the_layers_no_verb_reached(tmp_path):
    folder = sharded("qwen3", tmp_path / "m")
    eager = tuili.load(folder)
    saved = tuili.load(tuili.load(folder, lazy=True).save(tmp_path / "out"))
    assert same_state(saved, eager)
    params = tuili.SamplingParams(max_tokens=6, temperature=0)
    want = tuili.LLM(eager).generate(["hello"], params)[0].outputs[0].token_ids
    got = tuili.LLM(tuili.load(folder, lazy=True)).generate(["hello"], params)[0].outputs[0].token_ids
    assert got == want


def test_a_large_model_is_saved_in_shards_that_transformers_reads(tmp_path):
    import transformers

    folder = sharded("llama-gqa", tmp_path / "m")
    model = tuili.load(folder)
    out = model.save(tmp_path / "out", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert same_state(tuili.load(out), model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 200, (1, 10))
    torch.testing.assert_close(hf(ids).logits, model.module(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "phi3"])  # phi3: q/k/v and gate/up stored fused
def test_a_quantized_model_is_converted_and_written_one_layer_at_a_time(name, tmp_path, monkeypatch):
    from tuili.models.formats import FORMATS

    model = tuili.load(sharded(name, tmp_path / "m"))
    quantize_(model, Int4WeightOnly(group_size=32), progress=False)
    fmt = FORMATS["compressed-tensors"]
    converted: dict[int, list] = {}  # decoder layer -> weak references to its stored tensors

    def save_layer(layer, dtype):
        index = next(int(n.split(".")[2]) for n, m in model.module.named_modules() if m is layer)
        gc.collect()
        alive = [i for i, refs in converted.items() if i < index and any(r() is not None for r in refs)]
        assert not alive, f"layers {alive} still held while layer {index} is converted"
        out = fmt.save_layer(layer, dtype)
        own = [b for b in layer.buffers()]  # a scale already in the stored dtype is the layer's own
        made = [t for t in out.values() if not any(t is b for b in own)]
        converted.setdefault(index, []).extend(weakref.ref(t) for t in made)
        return out

    monkeypatch.setitem(FORMATS, "compressed-tensors", type(fmt)(fmt.load, fmt.save_config, save_layer))
    out = model.save(tmp_path / "out", max_shard_bytes=20_000)
    assert len(converted) == model.config.num_hidden_layers >= 2
    monkeypatch.undo()
    assert same_state(tuili.load(out), model)


def test_a_truncated_shard_is_refused_at_load_time(tmp_path):
    folder = sharded("llama-gqa", tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=f"{shard.name}: corrupt or truncated"):
        tuili.load(folder, lazy=True)


def test_lazy_reads_other_checkpoints_whole(tmp_path):
    model = tuili.load("default", lazy=True)  # a GGUF file
    assert model.module.lazy_layers is None and not model.provenance[-1].get("lazy")
    folder = tmp_path / "bin"
    hf = save_hf_tiny("llama-gqa", folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    assert tuili.load(folder, lazy=True).module.lazy_layers is None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_tensors_read_from_a_shard_do_not_keep_it_mapped(tmp_path):
    """A tensor left mapped from its shard would keep the whole shard mapped (and what was read of
    it resident) for as long as it lives: a kept layer norm would hold all of its shard."""
    from tuili.models.checkpoint import Checkpoint

    folder = sharded("llama-gqa", tmp_path / "m")
    checkpoint = Checkpoint.find(folder)
    kept = checkpoint.read([n for n in checkpoint.where if n.endswith("norm.weight")])
    assert kept and all(t.abs().sum() > 0 for t in kept.values())
    maps = Path("/proc/self/maps").read_text()
    assert not [f for f in checkpoint.files if str(f) in maps]


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_perplexity_of_a_lazy_model_reads_one_layer_at_a_time(name, tmp_path):
    from tuili.data import perplexity

    folder = sharded(name, tmp_path)
    eager, lazy = tuili.load(folder), tuili.load(folder, lazy=True)
    windows = torch.randint(0, 259, (3, 24), generator=torch.Generator().manual_seed(3))
    held = []  # decoder layers in memory whenever a layer runs
    hooks = [
        layer.register_forward_pre_hook(
            lambda *_: held.append(sum(not p.is_meta for d in lazy.module.model.layers for p in d.parameters()))
        )
        for layer in lazy.module.model.layers
    ]
    got = perplexity(lazy.module, windows, progress=False)
    for h in hooks:
        h.remove()
    per_layer = sum(1 for _ in lazy.module.model.layers[0].parameters())
    assert held and max(held) == per_layer  # one layer's parameters, never two
    assert sorted(lazy.module.lazy_layers.pending) == list(range(lazy.config.num_hidden_layers))  # all back on disk
    expected = perplexity(eager.module, windows, progress=False)
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    assert got.num_tokens == expected.num_tokens
    quantize_(lazy, Int8WeightOnly(), RTN(), calib=CALIB, progress=False)  # the layers read again after
    quantize_(eager, Int8WeightOnly(), RTN(), calib=CALIB, progress=False)
    assert same_state(lazy, eager)
