"""Checkpoints carry what they were trained for and refuse what does not fit (issue 26): placement,
N_L, the decoder (architecture + config hash), the tokenizer (fingerprint); non-finite tensors and
malformed progress fields in state.json are refused naming the file; a loader position past the
corpus is refused instead of wrapping."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from reliability_setup import run_cli, write_tiny_setup

from cacheaug_engine.augment.coprocessor import CoprocessorConfig, decoder_identity
from cacheaug_engine.data.corpus import SequenceLoader
from cacheaug_engine.data.text import ByteTokenizer, tokenizer_fingerprint
from cacheaug_engine.models.loaders import load_model
from cacheaug_engine.train.checkpoint import (
    CheckpointError,
    check_compatible,
    coprocessor_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 1-step training run of the tiny setup: (setup dir, its checkpoint, the decoder it used)."""
    d = tmp_path_factory.mktemp("compat")
    common = write_tiny_setup(d)
    mp = pytest.MonkeyPatch()
    mp.setenv("CACHEAUG_CACHE", str(d / "cache"))
    from cacheaug_engine.cli.main import main

    assert main(["train", *common, "--steps", "1", "--out", str(d / "run")]) == 0
    yield d, d / "run" / "checkpoint", load_model(f"random:{d / 'tiny.json'}")
    mp.undo()


def _copy(ck, tmp_path):
    dst = tmp_path / "checkpoint"
    shutil.copytree(ck, dst)
    return dst


def _edit_state(ck, **changes):
    f = ck / "state.json"
    st = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            st.pop(k, None)
        else:
            st[k] = v
    f.write_text(json.dumps(st))


def test_checkpoint_records_what_it_was_trained_for(run):
    _, ck, dec = run
    st = load_checkpoint(ck).state
    assert st["decoder_identity"] == decoder_identity(dec)
    kind, arch, digest = st["decoder_identity"].split(":")
    assert (kind, arch, len(digest)) == ("decoder", "llama", 16), st["decoder_identity"]
    assert st["tokenizer_fingerprint"] == tokenizer_fingerprint(ByteTokenizer())
    assert st["coprocessor"]["placement"] == "paper" and st["coprocessor"]["num_latents"] == 2
    check_compatible(load_checkpoint(ck), dec, ByteTokenizer(), CoprocessorConfig(num_latents=2, lora_rank=2))


@pytest.mark.parametrize(
    "settings,needles",
    [
        ({"placement": "early"}, ["trained for placement 'paper'", "has placement 'early'"]),
        ({"num_latents": 4}, ["trained for num_latents 2", "has num_latents 4"]),
        ({"latents": "pause"}, ["trained for latents 'coprocessor'", "has latents 'pause'"]),
    ],
)
def test_coprocessor_settings_mismatch_names_both_values(run, settings, needles):
    _, ck, dec = run
    cfg = CoprocessorConfig(**{"num_latents": 2, "lora_rank": 2, **settings})
    with pytest.raises(CheckpointError) as info:
        check_compatible(load_checkpoint(ck), dec, coprocessor_config=cfg)
    msg = str(info.value)
    assert msg.startswith(f"{ck / 'state.json'}: "), msg
    for n in needles:
        assert n in msg, (n, msg)


def test_other_decoder_is_refused_with_both_identities(run, tmp_path):
    d, ck, dec = run
    cfg = json.loads((d / "tiny.json").read_text())
    cfg["rope_theta"] = 5000.0  # same shapes, so the tensors would load without a word
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    other = load_model(f"random:{tmp_path / 'other.json'}")
    with pytest.raises(CheckpointError) as info:
        coprocessor_from_checkpoint(other, load_checkpoint(ck))
    msg = str(info.value)
    have, now = decoder_identity(dec), decoder_identity(other)
    assert have != now and have.startswith("decoder:llama:") and now.startswith("decoder:llama:")
    assert f"trained on decoder {have}, but this decoder is {now}" in msg, msg


def test_other_tokenizer_is_refused_with_both_fingerprints(run):
    tokenizers = pytest.importorskip("tokenizers")
    _, ck, dec = run
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(CheckpointError) as info:
        coprocessor_from_checkpoint(dec, load_checkpoint(ck), tokenizer=tok)
    msg = str(info.value)
    assert f"trained with tokenizer {tokenizer_fingerprint(ByteTokenizer())}" in msg
    assert f"this tokenizer is {tokenizer_fingerprint(tok)}" in msg


def test_checkpoint_without_the_fields_is_not_checked_on_them(run, tmp_path):
    """Checkpoints written before these fields (the shipped assets) still load on any decoder of their shape."""
    _, ck, dec = run
    old = _copy(ck, tmp_path)
    _edit_state(old, decoder_identity=None, tokenizer_fingerprint=None)
    cop = coprocessor_from_checkpoint(dec, load_checkpoint(old), tokenizer=object())
    assert cop.num_latents == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_checkpoint_tensors_are_refused(run, tmp_path, value):
    _, ck, _ = run
    good = load_checkpoint(ck)
    tensors = dict(good.coprocessor, soft_tokens=torch.full_like(good.coprocessor["soft_tokens"], value))
    state = {k: v for k, v in good.state.items() if k not in ("format", "optimizer")}
    bad = save_checkpoint(tmp_path / "bad", coprocessor=tensors, state=state)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    n = tensors["soft_tokens"].numel()
    assert str(info.value).startswith(
        f"{bad / 'coprocessor.safetensors'}: tensor 'soft_tokens' holds {n} NaN/Inf value(s) of {n}"), str(info.value)
    assert load_checkpoint(bad, check_finite=False).coprocessor["soft_tokens"].isnan().any() == (value != value)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"step": "abc"}, "step: expected an integer >= 0, got 'abc'"),
        ({"step": -1}, "step: expected an integer >= 0, got -1"),
        ({"step": 2.5}, "step: expected an integer >= 0, got 2.5"),
        ({"loader": {"epoch": "x", "index": 0}}, "loader.epoch: expected an integer >= 0, got 'x'"),
        ({"loader": [1, 2]}, "loader: expected an object with epoch and index, got [1, 2]"),
    ],
)
def test_malformed_progress_fields_are_a_checkpoint_error(run, tmp_path, changes, needle):
    _, ck, _ = run
    bad = _copy(ck, tmp_path)
    _edit_state(bad, **changes)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == f"{bad / 'state.json'}: {needle}"


@pytest.mark.parametrize(
    "state,needle",
    [
        ({"epoch": 0, "index": 10**9, "seed": 0}, "index expected an integer in [0, 10]"),
        ({"epoch": -1, "index": 0, "seed": 0}, "epoch expected an integer >= 0, got -1"),
        ({"epoch": 0, "index": 11, "seed": 0}, "got 11"),
    ],
)
def test_loader_position_past_its_range_is_refused(state, needle):
    loader = SequenceLoader(torch.zeros(10, 4, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError) as info:
        loader.load_state_dict(state)
    assert needle in str(info.value) and str(info.value).startswith("loader position: "), str(info.value)
    loader.load_state_dict({"epoch": 3, "index": 10, "seed": 0})  # the end of an epoch is a valid position
    assert loader.next_batch().shape == (2, 4) and loader.epoch == 4


def test_resume_with_a_loader_position_past_the_corpus(run, tmp_path, capsys):
    d, ck, _ = run
    out = tmp_path / "run"
    _copy(ck, out)
    _edit_state(out / "checkpoint", loader={"epoch": 0, "index": 10**9, "seed": 0})
    common = write_tiny_setup(d)
    code, err = run_cli(["train", *common, "--steps", "3", "--out", str(out), "--resume"], capsys)
    assert code == 2, err
    assert err.strip().startswith(f"cacheaug: error: --resume: {out / 'checkpoint'}: loader position: index"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
