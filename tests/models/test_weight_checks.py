"""Weights as the loaders read them (issue 26): a corrupted payload (NaN/Inf), integer tensors in a
float model and a config.json whose KV heads do not divide its heads are refused, naming the file,
the tensor or key and what to change; a prompt past the trained positions warns once per call."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from model_fixtures import hf_config_kwargs, tiny_config, tiny_decoder
from safetensors.torch import save_file

from cacheaug_engine.generation import generate
from cacheaug_engine.models import load_decoder
from cacheaug_engine.models.config import DecoderConfig, PositionRangeWarning

pytestmark = pytest.mark.reliability
TENSOR = "layers.0.attn.q_proj.weight"


def _hf_dir(path: Path, edit=None) -> Path:
    """A HF-format directory of the tiny llama (our parameter names are valid HF names for the loader)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", **hf_config_kwargs(tiny_config("llama"))}
    (path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.clone().contiguous() for k, v in tiny_decoder("llama").state_dict().items() if k != "lm_head.weight"}
    if edit is not None:
        edit(state)
    save_file(state, str(path / "model.safetensors"))
    return path


def _corrupt_payload(file: Path, name: str, value: float) -> None:
    """Overwrite the first fp32 element of tensor ``name`` in place, the header left intact (a flipped
    payload, as a bad disk or a truncated copy gives)."""
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start : start + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(raw))


def test_clean_directory_loads(tmp_path):
    m = load_decoder(_hf_dir(tmp_path / "ok"))
    assert torch.isfinite(m.embed(torch.tensor([[1, 2]]))).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_corrupted_payload_is_refused_naming_file_and_tensor(tmp_path, value):
    path = _hf_dir(tmp_path / "bad")
    _corrupt_payload(path / "model.safetensors", TENSOR, value)
    with pytest.raises(ValueError) as info:
        load_decoder(path)
    msg = str(info.value)
    assert msg.startswith(f"{path / 'model.safetensors'}: tensor '{TENSOR}' holds 1 NaN/Inf value(s)"), msg
    assert "check_finite=False" in msg
    m = load_decoder(path, check_finite=False)  # the documented way to skip the scan
    assert not torch.isfinite(m.state_dict()[TENSOR]).all()


def test_int32_weights_are_refused_not_cast(tmp_path):
    path = _hf_dir(tmp_path / "int", edit=lambda st: st.update({TENSOR: st[TENSOR].round().to(torch.int32)}))
    with pytest.raises(ValueError) as info:
        load_decoder(path, check_finite=False)
    assert str(info.value).startswith(f"{path / 'model.safetensors'}: tensor '{TENSOR}' has dtype int32; expected "
                                      "floating-point weights"), str(info.value)


def test_config_json_heads_not_dividing_says_what_to_change(tmp_path):
    path = _hf_dir(tmp_path / "heads")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_key_value_heads=3)  # 4 query heads
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        load_decoder(path)
    msg = str(info.value)
    assert msg.startswith(f"{path / 'config.json'}: num_key_value_heads"), msg
    assert "set num_key_value_heads to one of 1, 2, 4" in msg and "num_attention_heads to a multiple of 3" in msg


def test_decoder_config_heads_not_dividing_says_what_to_change():
    with pytest.raises(ValueError, match=r"set num_kv_heads to one of 1, 2, 4 .* or num_heads to a multiple of 3"):
        DecoderConfig(**{**tiny_config("llama").to_dict(), "num_kv_heads": 3})


def test_prompt_past_trained_positions_warns_once_per_call():
    dec = tiny_decoder("llama")  # max_position_embeddings = 512
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = generate(dec, torch.randint(0, 256, (1, 600)), max_new_tokens=3)
    assert len(out.tokens[0]) == 3
    hits = [w for w in seen if issubclass(w.category, PositionRangeWarning)]
    assert len(hits) == 1, [str(w.message) for w in seen]
    assert "603 positions" in str(hits[0].message) and "max_position_embeddings = 512" in str(hits[0].message)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generate(dec, torch.randint(0, 256, (1, 500)), max_new_tokens=3)
    assert not [w for w in seen if issubclass(w.category, PositionRangeWarning)]
