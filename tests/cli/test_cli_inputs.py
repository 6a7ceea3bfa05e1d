"""Reliability suite, command line: every bad input to every command is one ``cacheaug: error:``
line naming the argument or file and what was expected, exit code 2, and (where the input
allows) it is reported before any model load - the loaders are patched to fail if reached.

Cases run in-process through ``cli.main(argv)``; ``{d}`` in an argv is the setup directory,
``{ck}`` a valid checkpoint trained once per module, ``{tmp}`` the test's own tmp_path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_setup import assert_one_error, forbid_model_load, run_cli, write_tiny_setup

from cacheaug_engine.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    common = write_tiny_setup(d)
    mp = pytest.MonkeyPatch()
    mp.setenv("CACHEAUG_CACHE", str(d / "cache"))
    from cacheaug_engine.cli.main import main

    assert main(["train", *common, "--steps", "2", "--save-every", "1", "--out", str(d / "run")]) == 0
    (d / "adir").mkdir()
    (d / "afile").write_text("x")
    (d / "notresult.json").write_text(json.dumps({"hello": 1}))
    (d / "notjson.json").write_text("{nope")
    yield d, common, d / "run" / "checkpoint"
    mp.undo()


def _fill(argv: list[str], d: Path, ck: Path, tmp: Path) -> list[str]:
    return [a.format(d=d, ck=ck, tmp=tmp) for a in argv]


TRAIN = "train"
# (extra argv after "train <common>", needles in the one error line)
TRAIN_CASES = [
    (["--device", "foo"], ["device (--device)", "'foo'", "expected"]),
    (["--device", "cuda:7"], ["device (--device)", "cuda"]),
    (["--threads", "-1"], ["threads (--threads)", ">= 1"]),
    (["--threads", "0"], ["threads (--threads)", ">= 1"]),
    (["--lr", "inf"], ["lr (--lr)", "finite"]),
    (["--lr", "nan"], ["lr (--lr)", "finite"]),
    (["--lr", "0"], ["lr (--lr)", "> 0"]),
    (["--clip", "-1"], ["clip (--clip)", ">= 0"]),
    (["--clip", "nan"], ["clip (--clip)", "finite"]),
    (["--weight-decay", "-0.1"], ["weight_decay (--weight-decay)", ">= 0"]),
    (["--soft-lr-mult", "0"], ["soft_lr_mult (--soft-lr-mult)", "> 0"]),
    (["--soft-lr-mult", "nan"], ["soft_lr_mult (--soft-lr-mult)", "finite"]),
    (["--first-weight", "0"], ["first_weight (--first-weight)", "> 0"]),
    (["--first-weight", "inf"], ["first_weight (--first-weight)", "finite"]),
    (["--stop-after", "-1"], ["stop_after (--stop-after)", ">= 0"]),
    (["--steps", "0"], ["steps (--steps)", ">= 1"]),
    (["--min-lr-ratio", "2"], ["min_lr_ratio", "[0, 1]"]),
    (["--heldout-frac", "1.0"], ["heldout_frac (--heldout-frac)", "[0, 1)"]),
    (["--heldout-frac", "nan"], ["heldout_frac (--heldout-frac)", "finite"]),
    (["--lora-alpha", "-1"], ["lora_alpha (--lora-alpha)", "> 0"]),
    (["--scale-init", "inf"], ["scale_init (--scale-init)", "finite"]),
    (["--seed", "-3"], ["seed (--seed)", ">= 0"]),
    (["--max-chars", "0"], ["max_chars (--max-chars)", ">= 1"]),
    (["--seq-len", "8"], ["seq_len", "too short"]),
    (["--data", "{d}/adir"], ["{d}/adir", "is a directory", ".jsonl"]),
    (["--data", "{d}/missing.txt"], ["{d}/missing.txt", "no such file"]),
    (["--out", "{d}/afile/sub"], ["out (--out)", "{d}/afile/sub", "writable directory"]),
    (["--config", "{d}/notjson.json"], ["--config", "not valid JSON"]),
    (["--config", "{d}/missing.json"], ["--config", "no such file"]),
    (["--steps", "abc"], ["--steps", "invalid int"]),
]


@pytest.mark.parametrize("extra,needles", TRAIN_CASES, ids=[" ".join(c[0])[:40] for c in TRAIN_CASES])
def test_train_bad_values(env, tmp_path, capsys, monkeypatch, extra, needles):
    d, common, ck = env
    forbid_model_load(monkeypatch)
    argv = ["train", *common, "--out", str(tmp_path / "run"), *_fill(extra, d, ck, tmp_path)]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, *[n.format(d=d) for n in needles])


@pytest.mark.parametrize(
    "conf,needles",
    [
        ({"lr": "fast"}, ["lr (--lr)", "finite number", "'fast'"]),
        ({"steps": True}, ["steps (--steps)", "integer", "True"]),
        ({"init_from": 3}, ["init_from (--init-from)", "a string or null"]),
        ({"stepz": 3}, ["unknown config keys", "stepz"]),
        ({"grad_accum": 1.5}, ["grad_accum (--grad-accum)", "integer"]),
    ],
)
def test_train_bad_config_file(env, tmp_path, capsys, monkeypatch, conf, needles):
    d, common, _ = env
    forbid_model_load(monkeypatch)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(conf))
    code, err = run_cli(["train", *common, "--out", str(tmp_path / "r"), "--config", str(f)], capsys)
    assert_one_error(code, err, *needles)


def _copy_run(env, tmp_path) -> Path:
    d, _, ck = env
    out = tmp_path / "run"
    shutil.copytree(ck.parent, out)
    return out


def test_resume_missing_checkpoint(env, tmp_path, capsys, monkeypatch):
    _, common, _ = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert_one_error(code, err, "--resume", "no such checkpoint", str(tmp_path / "none" / "checkpoint"))


def test_resume_lists_every_changed_setting(env, tmp_path, capsys, monkeypatch):
    _, common, _ = env
    out = _copy_run(env, tmp_path)
    forbid_model_load(monkeypatch)
    argv = ["train", *common, "--steps", "3", "--out", str(out), "--resume", "--num-latents", "3", "--ahead", "4"]
    code, err = run_cli(argv, capsys)
    changed = ("num_latents (--num-latents): checkpoint 2, now 3", "ahead (--ahead): checkpoint 3, now 4")
    assert_one_error(code, err, *changed)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["train_config"]["num_latents"] == 2  # nothing new written next to the old tensors


def test_resume_without_train_config(env, tmp_path, capsys, monkeypatch):
    _, common, _ = env
    out = _copy_run(env, tmp_path)
    sf = out / "checkpoint" / "state.json"
    state = json.loads(sf.read_text())
    del state["train_config"]
    sf.write_text(json.dumps(state))
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(out), "--resume"], capsys)
    assert_one_error(code, err, str(sf), "train_config")


def test_resume_without_optimizer_file(env, tmp_path, capsys, monkeypatch):
    _, common, _ = env
    out = _copy_run(env, tmp_path)
    (out / "checkpoint" / "optimizer.safetensors").unlink()
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(out), "--resume"], capsys)
    assert_one_error(code, err, str(out / "checkpoint" / "optimizer.safetensors"), "missing", "resume exactly")


def test_resume_accepts_the_old_copy(env, tmp_path, capsys):
    """A crash between the two renames leaves only .checkpoint.old: --resume takes it, like load_checkpoint."""
    _, common, _ = env
    out = _copy_run(env, tmp_path)
    (out / "checkpoint").rename(out / ".checkpoint.old")
    assert load_checkpoint(out / "checkpoint").state["step"] == 2
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "checkpoint").state["step"] == 3
    assert not (out / ".checkpoint.old").exists()


def test_resume_may_change_steps_and_lr(env, tmp_path, capsys):
    _, common, _ = env
    out = _copy_run(env, tmp_path)
    argv = ["train", *common, "--steps", "3", "--lr", "0.0005", "--save-every", "3", "--out", str(out), "--resume"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    st = load_checkpoint(out / "checkpoint").state
    assert st["step"] == 3 and st["train_config"]["lr"] == 0.0005


@pytest.mark.parametrize(
    "cfg_edit,needles",
    [
        ({"bogus_key": 1}, ["unknown DecoderConfig keys", "bogus_key"]),
        ({"num_heads": 0}, ["num_heads", ">= 1"]),
        ({"num_kv_heads": 3}, ["num_kv_heads", "divide"]),
        ({"rope_theta": 0}, ["rope_theta", "> 0"]),
        ({"rms_norm_eps": -1e-5}, ["rms_norm_eps", "> 0"]),
    ],
)
def test_random_model_config(env, tmp_path, capsys, cfg_edit, needles):
    d, common, _ = env
    cfg = json.loads((d / "tiny.json").read_text())
    cfg.update(cfg_edit)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(cfg))
    code, err = run_cli(["train", *common, "--model", f"random:{f}", "--out", str(tmp_path / "r")], capsys)
    assert_one_error(code, err, str(f), *needles)


DEMO_CASES = [
    (["--eval-ahead", "1000"], ["--eval-ahead", "[1, 32]", "1000"]),
    (["--eval-ahead", "0"], ["--eval-ahead", "[1, 32]", "got 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--prompt", ""], ["--prompt", "non-empty"]),
    (["--device", "foo"], ["--device", "'foo'"]),
    (["--lr", "nan"], ["lr (--lr)", "finite"]),
    (["--out", "{d}/afile"], ["out (--out)", "writable directory"]),
    (["--data", "{d}/adir"], ["is a directory"]),
]


@pytest.mark.parametrize("extra,needles", DEMO_CASES, ids=[" ".join(c[0])[:40] for c in DEMO_CASES])
def test_demo_bad_values_before_training(env, tmp_path, capsys, monkeypatch, extra, needles):
    d, common, ck = env
    forbid_model_load(monkeypatch)
    argv = ["demo", *common, "--from-scratch", "--steps", "2", "--out", str(tmp_path / "demo")]
    code, err = run_cli([*argv, *_fill(extra, d, ck, tmp_path)], capsys)
    assert_one_error(code, err, *needles)


def _broken_ckpt(env, tmp_path, how: str) -> Path:
    out = _copy_run(env, tmp_path) / "checkpoint"
    if how == "no_train_config":
        st = json.loads((out / "state.json").read_text())
        del st["train_config"]
        (out / "state.json").write_text(json.dumps(st))
    elif how == "state_not_json":
        (out / "state.json").write_text("{truncated")
    elif how == "bad_format":
        st = json.loads((out / "state.json").read_text())
        st["format"] = "something-else/9"
        (out / "state.json").write_text(json.dumps(st))
    elif how == "truncated_coprocessor":
        f = out / "coprocessor.safetensors"
        f.write_bytes(f.read_bytes()[:50])
    elif how == "missing_coprocessor":
        (out / "coprocessor.safetensors").unlink()
    return out


EVAL_CASES = [
    (["{tmp}/missing"], ["{tmp}/missing", "no such checkpoint"]),
    (["{d}/afile"], ["{d}/afile", "expected a checkpoint directory"]),
    (["{d}/adir"], ["{d}/adir/state.json", "missing"]),
    (["{ck}", "--ahead", "0"], ["--ahead", "got 0"]),
    (["{ck}", "--ahead", "1000"], ["--ahead", "[1, 39]"]),
    (["{ck}", "--seq-len", "1"], ["--seq-len", "expected an integer >= 4", "N_A = 3", "got 1"]),
    (["{ck}", "--eval-seqs", "0"], ["--eval-seqs", ">= 1"]),
    (["{ck}", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["{ck}", "--device", "foo"], ["--device", "'foo'"]),
    (["{ck}", "--data", "{d}/adir"], ["--data", "is a directory"]),
    (["{ck}", "--out", "{d}/afile"], ["--out", "writable directory"]),
]


@pytest.mark.parametrize("argv,needles", EVAL_CASES, ids=[" ".join(c[0])[-40:] for c in EVAL_CASES])
def test_eval_bad_values(env, tmp_path, capsys, monkeypatch, argv, needles):
    d, _, ck = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", *_fill(argv, d, ck, tmp_path)], capsys)
    assert_one_error(code, err, *[n.format(d=d, ck=ck, tmp=tmp_path) for n in needles])


@pytest.mark.parametrize(
    "how,file,needles",
    [
        ("no_train_config", "state.json", ["train_config"]),
        ("state_not_json", "state.json", ["unreadable"]),
        ("bad_format", "state.json", ["unknown checkpoint format", "something-else/9"]),
        ("truncated_coprocessor", "coprocessor.safetensors", ["unreadable safetensors"]),
        ("missing_coprocessor", "coprocessor.safetensors", ["missing"]),
    ],
)
def test_eval_broken_checkpoint_names_the_file(env, tmp_path, capsys, monkeypatch, how, file, needles):
    ck = _broken_ckpt(env, tmp_path, how)
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", str(ck)], capsys)
    assert_one_error(code, err, str(ck / file), *needles)


GENERATE_CASES = [
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--temperature", "-1"], ["--temperature", ">= 0"]),
    (["--top-k", "-1"], ["--top-k", ">= 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--num-samples", "0"], ["--num-samples", ">= 1"]),
    (["--prompt", ""], ["--prompt", "non-empty"]),
    (["--latents", "{tmp}/nolat.safetensors"], ["--latents", "no such file"]),
    (["--save-latents", "{d}/afile/lat.safetensors"], ["--save-latents", "writable directory"]),
    (["--device", "cuda"], ["--device", "no CUDA device"]),
    (["--checkpoint", "{tmp}/nock"], ["{tmp}/nock", "no such checkpoint"]),
]


@pytest.mark.parametrize("extra,needles", GENERATE_CASES, ids=[" ".join(c[0])[:40] for c in GENERATE_CASES])
def test_generate_bad_values(env, tmp_path, capsys, monkeypatch, extra, needles):
    import torch

    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("a CUDA device exists here")
    d, _, ck = env
    forbid_model_load(monkeypatch)
    argv = ["generate", "--checkpoint", str(ck), "--prompt", "Line 3:", "--device", "cpu"]
    code, err = run_cli([*argv, *_fill(extra, d, ck, tmp_path)], capsys)
    assert_one_error(code, err, *[n.format(d=d, ck=ck, tmp=tmp_path) for n in needles])


BENCH_CASES = [
    (["plot", "{d}/notresult.json"], ["{d}/notresult.json", "not a bench result", "records"]),
    (["plot", "{d}/notjson.json"], ["{d}/notjson.json", "not valid JSON"]),
    (["plot", "{tmp}/none.json"], ["{tmp}/none.json", "no such result file"]),
    (["plot"], ["bench plot", "result JSON files"]),
    (["ops", "{d}/afile"], ["unexpected arguments"]),
    (["nonsense"], ["invalid choice", "nonsense"]),
]


@pytest.mark.parametrize("extra,needles", BENCH_CASES, ids=[" ".join(c[0])[:40] for c in BENCH_CASES])
def test_bench_bad_inputs(env, tmp_path, capsys, extra, needles):
    d, _, ck = env
    code, err = run_cli(["bench", *_fill(extra, d, ck, tmp_path)], capsys)
    assert_one_error(code, err, *[n.format(d=d, tmp=tmp_path) for n in needles])


@pytest.mark.parametrize("argv", [["info", "extra"], ["frobnicate"], ["train", "--no-such-flag"]])
def test_unknown_commands_and_flags(argv, capsys):
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, argv[-1])


EXPORT_CASES = [
    (["{tmp}/missing", "{tmp}/dst"], ["{tmp}/missing", "no such checkpoint"]),
    (["{d}/afile", "{tmp}/dst"], ["{d}/afile", "expected a checkpoint directory"]),
    (["{ck}", "{ck}"], ["is the source checkpoint"]),
    (["{ck}", "{d}"], ["{d}: exists and is not a checkpoint directory", "refusing to replace it"]),
    (["{ck}", "{d}/afile"], ["{d}/afile: exists and is not a checkpoint directory"]),
    (["{ck}", "{d}/afile/sub"], ["{d}/afile", "cannot create the checkpoint directory"]),
    (["{ck}", "{tmp}/dst", "--dtype", "int8"], ["--dtype", "invalid choice"]),
]


@pytest.mark.parametrize("argv,needles", EXPORT_CASES, ids=[" ".join(c[0])[-40:] for c in EXPORT_CASES])
def test_export_bad_inputs(env, tmp_path, capsys, argv, needles):
    d, _, ck = env
    before = sorted(p.name for p in d.iterdir())
    code, err = run_cli(["export", *_fill(argv, d, ck, tmp_path)], capsys)
    assert_one_error(code, err, *[n.format(d=d, ck=ck, tmp=tmp_path) for n in needles])
    assert sorted(p.name for p in d.iterdir()) == before  # nothing of the user's was moved or removed
    assert load_checkpoint(ck).optimizer_tensors  # the training checkpoint is intact


def test_init_from_records_the_checkpoints_shapes(env, tmp_path, capsys):
    """--init-from: the coprocessor's settings come from that checkpoint; state.json records them,
    not the flags' values, so it never describes tensors of other shapes."""
    _, common, ck = env
    out = tmp_path / "run"
    argv = ["train", *common, "--init-from", str(ck), "--num-latents", "5", "--lora-rank", "4", "--steps", "1",
            "--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    st = load_checkpoint(out / "checkpoint").state
    assert st["coprocessor"]["num_latents"] == st["train_config"]["num_latents"] == 2
    assert st["coprocessor"]["lora_rank"] == st["train_config"]["lora_rank"] == 2
    # and a resume with the same flags is accepted (the flags are re-read from the checkpoint)
    code, err = run_cli([*argv[:-4], "--steps", "2", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "checkpoint").state["step"] == 2


KERNELS_CASES = [
    (["--targets", "5"], ["--targets", "compute capabilities"]),
    (["--targets", "eighty"], ["--targets", "'eighty'"]),
    (["--workers", "0"], ["--workers", ">= 1"]),
    (["--compile", "--out", "{d}/adir"], ["--out", "is a directory", "file path"]),
    (["--compile", "--out", "{d}/afile/k.json"], ["--out", "writable directory"]),
    (["--compile", "--markdown", "{d}/adir"], ["--markdown", "is a directory"]),
]


@pytest.mark.parametrize("extra,needles", KERNELS_CASES, ids=[" ".join(c[0])[:40] for c in KERNELS_CASES])
def test_kernels_bad_inputs_before_compiling(env, tmp_path, capsys, monkeypatch, extra, needles):
    import cacheaug_engine.cli.kernels as kc

    def no_compile(*a, **k):
        raise AssertionError("compiling started before the bad input was reported")

    monkeypatch.setattr(kc.kernel_sweep, "run", no_compile)
    d, _, ck = env
    argv = ["kernels", "--out", str(tmp_path / "k.json"), *_fill(extra, d, ck, tmp_path)]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, *needles)


@pytest.mark.parametrize(
    "pause,needles",
    [("{tmp}/nopause", ["{tmp}/nopause", "no such checkpoint"]), ("{ck}", ["--pause", "not a pause-table checkpoint"])],
)
def test_eval_bad_pause_checkpoint(env, tmp_path, capsys, monkeypatch, pause, needles):
    d, _, ck = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["eval", str(ck), "--pause", pause.format(ck=ck, tmp=tmp_path)], capsys)
    assert_one_error(code, err, *[n.format(tmp=tmp_path) for n in needles])


@pytest.mark.parametrize("flag_,value", [("--contrast", "-1"), ("--contrast-margin", "nan")])
def test_train_method_controls_ranges(env, tmp_path, capsys, monkeypatch, flag_, value):
    _, common, _ = env
    forbid_model_load(monkeypatch)
    code, err = run_cli(["train", *common, "--out", str(tmp_path / "r"), flag_, value], capsys)
    assert_one_error(code, err, f"({flag_})")


@pytest.mark.parametrize(
    "edit,needles",
    [
        ({"scale_init": float("nan")}, ["scale_init", "finite"]),
        ({"num_latents": "2"}, ["num_latents", "integer"]),
        ({"nmu_latents": 2}, ["unknown CoprocessorConfig keys", "nmu_latents"]),
        ({"placement": "late"}, ["placement", "late"]),
    ],
)
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_hand_edited_coprocessor_section(env, tmp_path, capsys, monkeypatch, edit, needles, command):
    out = _copy_run(env, tmp_path) / "checkpoint"
    st = json.loads((out / "state.json").read_text())
    st["coprocessor"].update(edit)
    (out / "state.json").write_text(json.dumps(st))
    forbid_model_load(monkeypatch)
    argv = ["eval", str(out)] if command == "eval" else ["generate", "--checkpoint", str(out), "--prompt", "x"]
    code, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert_one_error(code, err, str(out / "state.json"), *needles)
