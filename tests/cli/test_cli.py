"""The cacheaug CLI on a tiny random decoder: train, resume, eval, generate, demo, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from model_fixtures import tiny_config

from cacheaug_engine.cli.main import main

TEXT = "\n\n".join(f"Line {i}: cache augmentation appends latent embeddings to the KV cache." for i in range(300))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "tiny.json"
    c = tiny_config("llama")
    c.vocab_size = 259  # the byte tokenizer's vocabulary
    cfg.write_text(json.dumps(c.to_dict()))
    text = d / "text.txt"
    text.write_text(TEXT)
    return d, [
        "--model",
        f"random:{cfg}",
        "--data",
        str(text),
        "--seq-len",
        "40",
        "--batch-size",
        "2",
        "--num-latents",
        "2",
        "--ahead",
        "3",
        "--positions",
        "4",
        "--lora-rank",
        "2",
        "--no-progress",
        "--heldout-frac",
        "0.2",
        "--device",
        "cpu",
    ]


def test_train_resume_eval_generate(setup, tmp_path, capsys, monkeypatch):
    d, common = setup
    monkeypatch.setenv("CACHEAUG_CACHE", str(d / "cache"))
    out = tmp_path / "run"
    argv = ["train", *common, "--steps", "3", "--stop-after", "2", "--eval-every", "2", "--eval-seqs", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    # the periodic eval carries the controls (shuffled, mean) and the cache-dependence figure
    assert set(state["evals"][0]["summary"]["mean"]["change_pct"]) == {"decoder", "shuffled", "mean"}
    assert 0 < state["evals"][0]["summary"]["cache_dependence"] < 1
    assert main(["train", *common, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    ev = tmp_path / "ev"
    ck = str(out / "checkpoint")
    pz = tmp_path / "pause"
    assert main(["train", *common, "--steps", "1", "--latents", "pause", "--out", str(pz)]) == 0
    pck = str(pz / "checkpoint")
    assert main(["eval", ck, ck, "--pause", pck, "--eval-seqs", "2", "--out", str(ev), "--device", "cpu"]) == 0
    res = json.loads((ev / "eval.json").read_text())
    tab = res["results"][0]["controls"]
    assert len(res["results"]) == 2 and tab["positions"] == [1, 2, 3, "mean 1-3"]
    assert set(tab["ppl"]) == {"decoder", "pause", "coprocessor", "shuffled", "mean"}
    assert set(tab["change_pct"]) == {"decoder", "pause", "shuffled", "mean"}
    assert (ev / "ppl_0.png").stat().st_size > 0
    assert main(["eval", ck, "--pause", ck, "--out", str(ev), "--device", "cpu"]) == 2  # not a pause table
    lat = tmp_path / "lat.safetensors"
    args = ["generate", "--checkpoint", ck, "--prompt", "Line 3: cache", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--save-latents", str(lat)]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*args, "--latents", str(lat)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first
    assert main([*args, "--no-augment", "--num-samples", "2", "--temperature", "1"]) == 0
    assert capsys.readouterr().out.count("[plain") == 2


def test_config_file_and_flags(setup, tmp_path, monkeypatch):
    d, common = setup
    monkeypatch.setenv("CACHEAUG_CACHE", str(d / "cache"))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"steps": 1, "lr": 0.01, "ahead": 5}))
    out = tmp_path / "run"
    assert main(["train", *common, "--config", str(conf), "--out", str(out)]) == 0
    tc = json.loads((out / "checkpoint" / "state.json").read_text())["train_config"]
    assert tc["lr"] == 0.01 and tc["ahead"] == 3 and tc["steps"] == 1  # flags beat the file


def test_demo_tiny(setup, tmp_path, monkeypatch):
    d, common = setup
    monkeypatch.setenv("CACHEAUG_CACHE", str(d / "cache"))
    out = tmp_path / "demo"
    argv = [
        "demo",
        *common,
        "--from-scratch",
        "--steps",
        "2",
        "--eval-seqs",
        "2",
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--placement",
        "paper",
    ]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    tab = rep["controls"]
    assert set(tab["ppl"]) == {"decoder", "pause", "coprocessor", "shuffled", "mean"}
    assert all(len(v) == len(tab["positions"]) for v in tab["ppl"].values())
    assert set(rep["summary"]["mean"]["change_pct"]) == {"decoder", "pause", "shuffled", "mean"}
    assert rep["settings"]["placement"] == "paper" and rep["training"]["steps"] == 2
    assert len(rep["training"]["pause_history"]) == 2
    assert (out / "ppl.png").is_file() and (out / "checkpoint" / "coprocessor.safetensors").is_file()


@pytest.mark.parametrize("sub", ["demo", "train", "eval", "generate", "info", "bench"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: cacheaug" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--steps", "-1", "--model", "x"], "steps"),
        (["train", "--data", "/no/such/file.txt", "--model", "random:/no/such.json"], "no such"),
        (["train", "--config", "/no/such/config.json"], "--config"),
        (["eval", "/no/such/checkpoint"], "no such checkpoint"),
        (["train", "--steps", "abc"], "invalid int"),
        (["generate", "--prompt", "x", "--checkpoint", "/no/ckpt"], "no such checkpoint"),
    ],
)
def test_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) if "abc" in argv else _nullcontext():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_entry_point_subprocess(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cacheaug_engine.cli", "eval", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "cacheaug_engine.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "backends" in r.stdout
    assert "capabilities" in r.stdout and "cascade_decode" in r.stdout and "64,128,256" in r.stdout
    assert "linear (frozen projections): auto = " in r.stdout


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
