"""`cacheaug train / eval / generate --model DIR` on a transformers-only architecture (qwen3): the
auto decoder implementation picks TransformersDecoder; a checkpoint trained on it evaluates and
generates, and refuses another decoder."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cacheaug_engine.cli.main import main  # noqa: E402


def _tiny(path, model_type: str = "qwen3") -> str:
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.slow  # ~30 s alone, ~80 s on a shared 2-core CPU
def test_train_eval_generate_cli(tmp_path, capsys) -> None:
    model = _tiny(tmp_path / "qwen3")
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--tokenizer", "bytes", "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--num-latents", "2", "--ahead", "4", "--positions", "2", "--lora-rank", "2",
                 "--max-chars", "6000", "--out", str(out), "--device", "cpu"]) == 0
    ck = str(out / "checkpoint")
    assert main(["eval", ck, "--eval-seqs", "2", "--batch-size", "2", "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    assert main(["generate", "--checkpoint", ck, "--prompt", "def f(x):", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert "[augmented]" in capsys.readouterr().out
    other = _tiny(tmp_path / "olmo2", "olmo2")
    assert main(["generate", "--checkpoint", ck, "--model", other, "--prompt", "x", "--max-new-tokens", "2",
                 "--device", "cpu"]) != 0
    assert "trained on decoder transformers:qwen3:" in capsys.readouterr().err
