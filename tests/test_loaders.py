"""HF-directory loader: logits equal transformers' on tiny random configs; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_fixtures import ARCHS, hf_config_kwargs, tiny_config

from cacheaug_engine.models import DecoderConfig, load_decoder

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
        load_decoder(bad)


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
