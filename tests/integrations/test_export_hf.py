"""``cacheaug export-hf``: a GGUF -> a HF directory our HF reader loads to the same decoder (issue 27)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf_fixtures import tiny_hf_llama, write_llama_gguf

from cacheaug_engine.cli.main import main
from cacheaug_engine.integrations.hf_export import check_parity, export_hf
from cacheaug_engine.models import load_decoder, load_tokenizer

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(tiny_hf_llama(), path, gguf.GGMLQuantizationType.Q8_0)
    return path


def test_export_hf_writes_a_dir_equal_to_the_gguf(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    report = export_hf(tiny_gguf, out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(report.files)
    assert report.tensors > 0 and report.max_abs_diff == 0.0 and report.logits_max_abs_diff == 0.0
    ref, got = load_decoder(tiny_gguf), load_decoder(out)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref(ids), got(ids))
    assert load_tokenizer(out).encode("ab 12 ba").ids == load_tokenizer(tiny_gguf).encode("ab 12 ba").ids
    assert (out / "export_report.json").is_file()


def test_parity_check_catches_a_changed_tensor(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    export_hf(tiny_gguf, out, check=False)
    state = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][0, 0] += 1e-3
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight differs"):
        check_parity(tiny_gguf, out)


def test_export_hf_cli_refuses_a_non_empty_dir(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["export-hf", str(tiny_gguf), str(tmp_path)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "missing.gguf"), str(tmp_path / "new")]) == 2


def test_export_hf_cli(tiny_gguf: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export-hf", str(tiny_gguf), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "tensors equal" in out and (tmp_path / "hf" / "config.json").is_file()
