"""Command-line inputs of the second hardening round (issue 26): one ``cacheaug: error:`` line naming
the argument or file and what was expected, exit code 2, before any model load where the input
allows; a prompt past the model's trained positions is one ``cacheaug: warning:`` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_setup import assert_one_error, forbid_model_load, run_cli, write_tiny_setup

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel2")
    common = write_tiny_setup(d)
    mp = pytest.MonkeyPatch()
    mp.setenv("CACHEAUG_CACHE", str(d / "cache"))
    from cacheaug_engine.cli.main import main

    assert main(["train", *common, "--steps", "2", "--out", str(d / "run")]) == 0
    (d / "blob.bin").write_bytes(bytes(range(256)) * 64)  # every byte value, NULs included
    (d / "controls.txt").write_bytes(b"\x01\x02\x03\x04abc\x05\x06\x07" * 500)  # no NUL, mostly control bytes
    (d / "one_paragraph.txt").write_text("a single short paragraph of text, one document " * 20)
    yield d, common, d / "run" / "checkpoint"
    mp.undo()


def _copy_run(ck: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(ck.parent, out)
    return out


def _edit_state(ck: Path, **changes) -> None:
    st = json.loads((ck / "state.json").read_text())
    st.update(changes)
    (ck / "state.json").write_text(json.dumps(st))


@pytest.mark.parametrize("name,reason", [("blob.bin", "a NUL byte at offset 0"), ("controls.txt", "control bytes")])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_binary_data_is_refused_by_a_text_sniff(env, tmp_path, capsys, monkeypatch, name, reason, command):
    d, common, ck = env
    forbid_model_load(monkeypatch)
    if command == "train":
        argv = ["train", *common, "--out", str(tmp_path / "r"), "--data", str(d / name)]
    else:
        argv = ["eval", str(ck), "--data", str(d / name), "--out", str(tmp_path / "e")]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, f"{d / name} looks binary", reason, "expected a UTF-8 text (.txt) or .jsonl file")


def test_eval_with_an_empty_heldout_split(env, tmp_path, capsys, monkeypatch):
    """One document: nothing is held out. It used to exit 0 with an empty report."""
    d, _, ck = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", str(ck), "--data", str(d / "one_paragraph.txt"), "--out", str(tmp_path / "e")],
                        capsys)
    assert_one_error(code, err, "held-out split is empty", str(d / "one_paragraph.txt"), "0 held-out document(s)",
                     "heldout_frac 0.2", "40 tokens", "expected at least one")
    assert not (tmp_path / "e" / "eval.json").exists()


def test_eval_seq_len_names_the_valid_setting_with_ahead(env, tmp_path, capsys, monkeypatch):
    _, _, ck = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", str(ck), "--seq-len", "1", "--ahead", "1", "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, "--seq-len: expected an integer >= 2", "trained with --seq-len 40", "got 1")


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"step": 999}, ["--resume:", "is at step 999, past steps (--steps) 5", "pass --steps > 999 to train further"]),
        ({"step": "abc"}, ["--resume:", "state.json: step: expected an integer >= 0, got 'abc'"]),
        ({"loader": {"epoch": 0, "index": -5}}, ["--resume:", "loader.index: expected an integer >= 0, got -5"]),
    ],
)
def test_resume_state_is_checked_before_the_model_loads(env, tmp_path, capsys, monkeypatch, changes, needles):
    _, common, ck = env
    out = _copy_run(ck, tmp_path)
    _edit_state(out / "checkpoint", **changes)
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--steps", "5", "--out", str(out), "--resume"], capsys)
    assert_one_error(code, err, str(out / "checkpoint"), *needles)


def test_plain_resume_on_an_out_with_only_a_distributed_checkpoint(env, tmp_path, capsys, monkeypatch):
    _, common, ck = env
    out = tmp_path / "run"
    (out / "checkpoint-dist").mkdir(parents=True)
    (out / "checkpoint-dist" / "COMPLETE").write_text("")
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(out), "--resume"], capsys)
    assert_one_error(code, err, f"{out / 'checkpoint'}: no such checkpoint", f"{out / 'checkpoint-dist'} exists",
                     "torchrun with --distributed ddp or fsdp", f"cacheaug export {out / 'checkpoint-dist'} DST",
                     "--init-from")


BENCH_CASES = [
    (["ops", "--smoke", "--repeats", "-1"], ["--repeats: expected an integer >= 1, got -1"]),
    (["ops", "--smoke", "--repeats", "0"], ["--repeats: expected an integer >= 1, got 0"]),
    (["ops", "--smoke", "--warmup", "-2"], ["--warmup: expected an integer >= 0, got -2"]),
    (["ops", "--smoke", "--time-budget", "nan"], ["--time-budget", "finite number > 0"]),
    (["ops", "--smoke", "--budget-s", "-5"], ["--budget-s (seconds): expected a finite number > 0.0, got -5.0"]),
    (["ops", "--device", "foo"], ["--device: expected 'auto', 'cpu' or 'cuda[:N]', got 'foo'"]),
    (["train", "--device", "tpu"], ["--device", "'tpu'"]),
]


@pytest.mark.parametrize("extra,needles", BENCH_CASES, ids=[" ".join(c[0]) for c in BENCH_CASES])
def test_bench_bad_numbers_and_device(env, capsys, monkeypatch, extra, needles):
    from cacheaug_engine.bench import cli as bench_cli

    def no_run(*a, **k):
        raise AssertionError("the benchmark started before the bad input was reported")

    monkeypatch.setattr(bench_cli, "run_sections", no_run)
    code, err = run_cli(["bench", *extra], capsys)
    assert_one_error(code, err, *needles)


def test_eval_on_another_decoder_names_both(env, tmp_path, capsys):
    d, _, ck = env
    cfg = json.loads((d / "tiny.json").read_text())
    cfg["rope_theta"] = 5000.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    code, err = run_cli(["eval", str(ck), "--model", f"random:{other}", "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, str(ck / "state.json"), "trained on decoder decoder:llama:",
                     "but this decoder is decoder:llama:", f"--model random:{d / 'tiny.json'}")


def test_eval_refuses_a_nan_checkpoint_before_the_model_loads(env, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    _, _, ck = env
    bad = _copy_run(ck, tmp_path) / "checkpoint"
    tensors = load_file(str(bad / "coprocessor.safetensors"))
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(bad / "coprocessor.safetensors"), metadata={"format": "cacheaug-checkpoint/1"})
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", str(bad), "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, str(bad / "coprocessor.safetensors"), "NaN/Inf value(s)", "check_finite=False")


def test_generate_past_trained_positions_warns_in_one_line(env, tmp_path, capsys):
    d, _, _ = env
    cfg = json.loads((d / "tiny.json").read_text())
    cfg["max_position_embeddings"] = 64
    small = tmp_path / "small.json"
    small.write_text(json.dumps(cfg))
    argv = ["generate", "--no-augment", "--model", f"random:{small}", "--tokenizer", "bytes", "--prompt", "x" * 80,
            "--max-new-tokens", "2", "--device", "cpu"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cacheaug: warning: generate: the longest row's prompt"), err
    assert "past the model's trained range (max_position_embeddings = 64)" in lines[0]


def test_random_config_heads_say_what_to_change(env, tmp_path, capsys, monkeypatch):
    d, common, _ = env
    cfg = json.loads((d / "tiny.json").read_text())
    cfg.update(num_kv_heads=3)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(cfg))
    code, err = run_cli(["train", *common, "--model", f"random:{f}", "--out", str(tmp_path / "r")], capsys)
    assert_one_error(code, err, str(f), "num_kv_heads: must divide num_heads (4)",
                     "set num_kv_heads to one of 1, 2, 4", "num_heads to a multiple of 3")
