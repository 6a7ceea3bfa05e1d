"""HF-directory loader: logits equal transformers' on tiny random configs; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import ARCHS, hf_config_kwargs, tiny_config
from safetensors.torch import save_file

from cacheaug_engine.models import DecoderConfig, load_decoder, load_tokenizer

transformers = pytest.importorskip("transformers")

HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}
TOL = 1e-4
SEQ = 24  # > Gemma's sliding window of 8


def _hf_model(arch: str, seed: int = 0):
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    hc = cfg_cls(**hf_config_kwargs(tiny_config(arch)), attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(hc).eval()
    with torch.no_grad():  # every weight random, norm weights too, so each one matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.1 * torch.randn_like(p) + (0.0 if arch == "gemma2" else 1.0))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tmp_path_factory):
    arch = request.param
    model = _hf_model(arch)
    path = tmp_path_factory.mktemp(f"hf_{arch}")
    model.save_pretrained(path)
    return arch, model, path


def _ids(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(7))


def test_forward_matches_transformers(saved) -> None:
    arch, hf, path = saved
    m = load_decoder(path)
    assert m.cfg.arch == arch and all(not p.requires_grad for p in m.parameters())
    ids = _ids(2, SEQ)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    out = m(ids)
    err = (out - ref).abs().max().item()
    print(f"{arch}: forward max|diff| = {err:.2e}")
    assert err <= TOL


def test_bf16_error_within_twice_transformers(saved) -> None:
    """bf16 weights and activations: our logits' error against transformers in float64 is at most twice
    transformers' own bf16 error on the same weights (+1e-3 for the rounding of tiny errors)."""
    import copy

    arch, hf, path = saved
    ids = _ids(2, SEQ)
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(ids).logits
        torch_err = (copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.double() - ref).abs().max().item()
    m = load_decoder(path, dtype=torch.bfloat16)
    out = m(ids)
    assert out.dtype == torch.float32 and m.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    print(f"{arch}: bf16 max|diff| vs fp64 = {err:.2e} (transformers bf16: {torch_err:.2e})")
    assert 0 < torch_err and err <= 2 * torch_err + 1e-3


def test_prefill_then_decode_matches_transformers(saved) -> None:
    arch, hf, path = saved
    m = load_decoder(path)
    ids = _ids(2, SEQ)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        # transformers' own incremental decode (its sliding-window cache for Gemma-2)
        out = hf(ids[:, :10], use_cache=True)
        past, hf_steps = out.past_key_values, []
        for t in range(10, SEQ):
            out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            hf_steps.append(out.logits[:, 0].float())
    logits, cache = m.prefill(ids[:, :10])
    assert (logits - ref[:, :10]).abs().max() <= TOL
    steps = torch.stack([m.decode_step(ids[:, t], cache) for t in range(10, SEQ)], 1)
    assert (steps - ref[:, 10:]).abs().max() <= TOL
    assert (steps - torch.stack(hf_steps, 1)).abs().max() <= TOL


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = _hf_model("qwen2", seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = _ids(1, 9)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (load_decoder(tmp_path)(ids) - ref).abs().max() <= TOL
    assert load_decoder(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_from_hf_gemma_defaults_even_layers_local() -> None:
    kw = hf_config_kwargs(tiny_config("gemma2"))
    del kw["layer_types"]
    cfg = DecoderConfig.from_hf({**transformers.Gemma2Config(**kw).to_dict()})
    assert cfg.layer_types == ("sliding", "full", "sliding", "full")
    assert cfg.window(0) == 8 and cfg.window(1) is None
    assert cfg.attn_scale == pytest.approx(48**-0.5)


def test_from_hf_rope_formats() -> None:
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=1)
    old = DecoderConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": llama3})
    new = DecoderConfig.from_hf({**base, "rope_parameters": {**llama3, "rope_theta": 5e5}})
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="rope_type"):
        DecoderConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_unsupported_architecture(saved, tmp_path: Path) -> None:
    _, _, path = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*unsupported model_type 'gpt2'"):
        load_decoder(bad, impl="native")  # impl="auto" would load it through transformers


def test_truncated_and_missing_files(saved, tmp_path: Path) -> None:
    _, _, path = saved
    bad = tmp_path / "trunc"
    shutil.copytree(path, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_decoder(bad)
    st.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_decoder(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_decoder(bad)
    with pytest.raises(FileNotFoundError):
        load_decoder(tmp_path / "nowhere")
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="GGUF"):
        load_decoder(junk)


def test_wrong_shapes_named(saved, tmp_path: Path) -> None:
    arch, _, path = saved
    bad = tmp_path / "shape"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight: expected shape"):
        load_decoder(bad)


def test_qwen2_sliding_window_layers(tmp_path: Path) -> None:
    kw = hf_config_kwargs(tiny_config("qwen2"))
    hc = transformers.Qwen2Config(**kw, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                  attn_implementation="eager")
    torch.manual_seed(2)
    hf = transformers.Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.05 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    hf.save_pretrained(tmp_path)
    m = load_decoder(tmp_path)
    assert m.cfg.layer_types == ("full", "sliding") and m.cfg.sliding_window == 6
    ids = _ids(1, 20)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (m(ids) - ref).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------
# Reliability suite, loaders and decoder configs: corrupt/truncated GGUF and safetensors, bad

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
        load_decoder(d, impl="native")  # fails on config.json, before any weight file is looked for
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
