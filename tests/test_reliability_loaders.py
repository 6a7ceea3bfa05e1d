"""Reliability suite, loaders and decoder configs: corrupt/truncated GGUF and safetensors, bad
config.json values, dtypes. Each is one ValueError/FileNotFoundError naming the file and the
key or what was expected - never a ZeroDivisionError, a silent replacement or NaN logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cacheaug_engine.models import DecoderConfig, load_decoder, load_tokenizer

HF = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def _hf_dir(tmp_path: Path, **edit) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    cfg = {**HF, **edit}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _valid_weights(d: Path) -> Path:
    cfg = DecoderConfig.from_hf(HF)
    from cacheaug_engine.models import Decoder

    state = Decoder.from_config(cfg).state_dict()
    state.pop("lm_head.weight", None)
    hf = {("model." + k if k != "lm_head.weight" else k): v.contiguous() for k, v in state.items()}
    hf = {k.replace(".attn.", ".self_attn.").replace("attn_norm", "input_layernorm")
          .replace("mlp_norm", "post_attention_layernorm"): v for k, v in hf.items()}
    f = d / "model.safetensors"
    save_file(hf, str(f))
    return f


def test_valid_hf_dir_loads(tmp_path):
    d = _hf_dir(tmp_path)
    _valid_weights(d)
    logits = load_decoder(d)(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "edit,needles",
    [
        ({"num_attention_heads": 0}, ["num_attention_heads", ">= 1"]),
        ({"num_key_value_heads": 0}, ["num_key_value_heads", ">= 1"]),
        ({"num_key_value_heads": 3, "num_attention_heads": 4, "hidden_size": 32}, ["num_key_value_heads", "dividing"]),
        ({"rope_theta": 0}, ["rope_theta", "> 0"]),
        ({"rope_theta": float("nan")}, ["rope_theta", "finite"]),
        ({"rms_norm_eps": -1e-6}, ["rms_norm_eps", "> 0"]),
        ({"vocab_size": 0}, ["vocab_size", ">= 1"]),
        ({"hidden_size": 33}, ["hidden_size", "multiple of num_attention_heads"]),
        ({"intermediate_size": -4}, ["intermediate_size", ">= 1"]),
        ({"num_hidden_layers": "two"}, ["num_hidden_layers", "integer"]),
        ({"head_dim": 0}, ["head_dim", ">= 1"]),
        ({"hidden_size": None}, ["missing required field", "hidden_size"]),
        ({"model_type": "gpt2"}, ["unsupported model_type", "gpt2"]),
    ],
)
def test_bad_config_json(tmp_path, edit, needles):
    d = _hf_dir(tmp_path, **edit)
    with pytest.raises(ValueError) as e:
        load_decoder(d)  # fails on config.json, before any weight file is looked for
    msg = str(e.value)
    assert str(d / "config.json") in msg
    for n in needles:
        assert n in msg, msg


def test_config_json_not_json_and_not_object(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_decoder(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        load_decoder(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_decoder(d)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, how):
    d = _hf_dir(tmp_path)
    f = _valid_weights(d)
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 200, "empty": b""}[how])
    with pytest.raises(ValueError) as e:
        load_decoder(d)
    assert str(f) in str(e.value) and "safetensors" in str(e.value)


def test_missing_shard_and_no_weights(tmp_path):
    d = _hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_decoder(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001.safetensors: shard listed"):
        load_decoder(d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="weight_map"):
        load_decoder(d)


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "not a readable GGUF file"), (b"GGUF\x03\x00\x00\x00", "not a readable GGUF file"),
     (b"GGUF" + b"\xff" * 64, "not a readable GGUF file")],
)
def test_corrupt_gguf_names_the_file(tmp_path, content, needle):
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_decoder(f)
    assert str(f) in str(e.value) and needle in str(e.value)
    with pytest.raises(ValueError) as e:
        load_tokenizer(f)
    assert str(f) in str(e.value)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match="not a model directory and not a GGUF file"):
        load_decoder(f)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_decoder(tmp_path / "nothing.gguf")


def _gguf(tmp_path: Path, **meta) -> Path:
    gguf = pytest.importorskip("gguf")
    f = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    vals = {"embedding_length": 32, "head_count": 2, "head_count_kv": 1, "block_count": 1,
            "feed_forward_length": 64, "layer_norm_rms_eps": 1e-5, "rope_freq_base": 10000.0, "vocab_size": 64}
    vals.update(meta)
    w.add_embedding_length(vals["embedding_length"])
    w.add_head_count(vals["head_count"])
    w.add_head_count_kv(vals["head_count_kv"])
    w.add_block_count(vals["block_count"])
    w.add_feed_forward_length(vals["feed_forward_length"])
    w.add_layer_norm_rms_eps(vals["layer_norm_rms_eps"])
    w.add_rope_freq_base(vals["rope_freq_base"])
    w.add_vocab_size(vals["vocab_size"])
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f


@pytest.mark.parametrize(
    "meta,needles",
    [
        ({"head_count": 0}, ["attention.head_count", ">= 1"]),
        ({"head_count_kv": 0}, ["num_kv_heads", ">= 1"]),
        ({"rope_freq_base": 0.0}, ["rope_theta", "> 0"]),
        ({"layer_norm_rms_eps": -1.0}, ["rms_norm_eps", "> 0"]),
        ({"embedding_length": 33}, ["embedding_length", "multiple"]),
    ],
)
def test_bad_gguf_metadata(tmp_path, meta, needles):
    f = _gguf(tmp_path, **meta)
    with pytest.raises(ValueError) as e:
        load_decoder(f)
    assert str(f) in str(e.value)
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, "float32"])
def test_load_decoder_rejects_non_float_dtype_before_reading(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype: expected a floating torch dtype"):
        load_decoder(tmp_path / "does-not-exist.gguf", dtype=dtype)  # checked before the path


@pytest.mark.parametrize(
    "field,value",
    [("rope_theta", 0.0), ("rope_theta", float("inf")), ("rms_norm_eps", -1e-5), ("num_heads", 0),
     ("num_kv_heads", 0), ("vocab_size", 0), ("head_dim", 0), ("attn_softcap", -1.0), ("sliding_window", 0),
     ("num_layers", 2.5)],
)
def test_decoder_config_ranges(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        DecoderConfig(**{field: value})


def test_decoder_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown DecoderConfig keys: nmu_heads"):
        DecoderConfig.from_dict({**DecoderConfig().to_dict(), "nmu_heads": 4})
