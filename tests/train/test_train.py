"""Trainer: exact resume, atomic checkpoints, schedule; data pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.data.corpus import (
    SequenceLoader,
    load_corpus,
    pack,
    read_documents,
    split_documents,
    tokenize_documents,
)
from cacheaug_engine.data.text import ByteTokenizer
from cacheaug_engine.train import checkpoint as ckpt_mod
from cacheaug_engine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cacheaug_engine.train.trainer import TrainConfig, lr_at, train

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox {i % 7} jumps over the lazy dog number {i * 13 % 17}." for i in range(400)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    f = d / "text.txt"
    f.write_text(TEXT)
    return load_corpus(ByteTokenizer(), 48, files=[str(f)], heldout_frac=0.2, cache=d / "cache")


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model="tiny",
        seq_len=48,
        batch_size=2,
        steps=4,
        lr=5e-3,
        warmup=1,
        num_latents=2,
        ahead=3,
        positions=4,
        lora_rank=2,
        out=str(tmp_path / "run"),
        seed=3,
        clip=1.0,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg, corpus, **kw):
    return train(cfg, decoder=tiny_decoder("llama"), corpus=corpus, progress=False, log=lambda s: None, **kw)


def test_resume_is_exact(tmp_path, corpus):
    full = _run(_cfg(tmp_path / "a", grad_accum=2), corpus)
    first = _run(_cfg(tmp_path / "b", grad_accum=2, stop_after=2), corpus)
    assert len(first.history) == 2
    torch.manual_seed(1234)  # a resumed run must not depend on the caller's RNG state
    second = _run(_cfg(tmp_path / "b", grad_accum=2), corpus, resume=True)
    la = [h["loss"] for h in full.history]
    lb = [h["loss"] for h in second.history]
    assert len(la) == len(lb) == 4
    assert la == lb
    for k, v in full.coprocessor.trainable_state().items():
        assert torch.equal(v, second.coprocessor.trainable_state()[k]), k
    state = load_checkpoint(tmp_path / "b" / "run" / "checkpoint").state
    assert state["step"] == 4 and state["coprocessor"]["num_latents"] == 2


def test_resume_rejects_changed_settings(tmp_path, corpus):
    _run(_cfg(tmp_path, steps=1), corpus)
    with pytest.raises(ValueError, match="seq_len"):
        _run(_cfg(tmp_path, steps=2, seq_len=40), corpus, resume=True)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_checkpoint(
        path, coprocessor={"w": torch.ones(3)}, state={"step": 1}, optimizer_tensors={"0.m": torch.zeros(2)}
    )

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(CheckpointError, match=r"coprocessor\.safetensors: cannot write checkpoint \(disk full\)"):
        save_checkpoint(path, coprocessor={"w": torch.zeros(3)}, state={"step": 2})
    assert not list(tmp_path.glob(".ck.tmp-*"))
    ck = load_checkpoint(path)
    assert ck.state["step"] == 1 and torch.equal(ck.coprocessor["w"], torch.ones(3))
    monkeypatch.undo()
    # a crash between the two renames: only the .old copy exists
    save_checkpoint(path, coprocessor={"w": torch.full((3,), 2.0)}, state={"step": 2})
    (tmp_path / ".ck.old").mkdir()
    for f in path.iterdir():
        f.rename(tmp_path / ".ck.old" / f.name)
    path.rmdir()
    assert load_checkpoint(path).state["step"] == 2
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nothing")


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=104, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.25)
    assert lr_at(3, cfg) == pytest.approx(1.0)
    assert lr_at(54, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(104, cfg) == pytest.approx(0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="placement"):
        TrainConfig(placement="late").validate()


def test_data_pipeline(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(30)) + "\n")
    docs = read_documents([j])
    assert len(docs) == 30
    tr1, he1 = split_documents(docs, 0.2)
    tr2, he2 = split_documents(docs, 0.2)
    assert he1 == he2 and len(he1) > 0 and not {d[0] for d in tr1} & {d[0] for d in he1}
    tok = ByteTokenizer()
    a = tokenize_documents(tr1, tok, cache=tmp_path / "c")
    b = tokenize_documents(tr1, tok, cache=tmp_path / "c")  # from the cache
    assert (a == b).all() and len(list((tmp_path / "c").glob("*.npy"))) == 1
    seqs = pack(a, 32)
    assert seqs.shape[1] == 32 and seqs.shape[0] == len(a) // 32
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_documents([bad])
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing.txt"])


def test_loader_resume():
    seqs = torch.arange(50).view(10, 5)
    a = SequenceLoader(seqs, 3, seed=1)
    batches = [a.next_batch() for _ in range(7)]
    b = SequenceLoader(seqs, 3, seed=1)
    for _ in range(4):
        b.next_batch()
    c = SequenceLoader(seqs, 3, seed=1)
    c.load_state_dict(b.state_dict())
    for want in batches[4:]:
        assert torch.equal(c.next_batch(), want)


def test_export_and_init_from(tmp_path, corpus):
    from cacheaug_engine.train.checkpoint import export_coprocessor

    res = _run(_cfg(tmp_path, steps=2), corpus)
    dst = export_coprocessor(tmp_path / "run" / "checkpoint", tmp_path / "asset", note="cacheaug train ...")
    ck = load_checkpoint(dst)
    assert not ck.optimizer_tensors and (dst / "COMMAND.md").read_text().startswith("cacheaug")
    assert all(v.dtype == torch.bfloat16 for v in ck.coprocessor.values())
    again = _run(_cfg(tmp_path / "b", steps=1, stop_after=0, init_from=str(dst), num_latents=5), corpus)
    assert again.coprocessor.num_latents == 2  # the checkpoint's coprocessor config wins
    for k, v in res.coprocessor.trainable_state().items():
        assert torch.allclose(again.coprocessor.trainable_state()[k], v, rtol=1e-2, atol=1e-3), k


def test_trainer_is_stateful_and_resumes_exactly_from_its_state_dict(tmp_path, corpus):
    from cacheaug_engine.train.trainer import Trainer

    def trainer(out):
        return Trainer(_cfg(tmp_path, out=str(tmp_path / out)), decoder=tiny_decoder("llama"), corpus=corpus,
                       log=lambda s: None)

    a = trainer("a")
    for _ in range(2):
        a.step()
    sd = a.state_dict()
    assert sd["state"]["step"] == 2 and set(sd) == {"coprocessor", "optimizer", "rng", "state"}
    b = trainer("b")
    b.load_state_dict(sd)
    ra, rb = a.step(), b.step()  # the same batch, the same positions, the same optimizer moments
    assert ra["loss"] == rb["loss"] and ra["step"] == rb["step"] == 3
    for k, v in a.coprocessor.trainable_state().items():
        assert torch.equal(v, b.coprocessor.trainable_state()[k]), k


@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
def test_bf16_precisions_train_with_fp32_master_weights(tmp_path, corpus, precision):
    from cacheaug_engine.train.trainer import Trainer

    t = Trainer(_cfg(tmp_path, precision=precision), decoder=tiny_decoder("llama"), corpus=corpus, log=lambda s: None)
    assert t.amp == torch.bfloat16
    assert t.decoder.dtype == (torch.bfloat16 if precision == "bf16-weights" else torch.float32)
    before = {k: v.clone() for k, v in t.coprocessor.trainable_state().items()}
    row = t.step()
    assert math.isfinite(row["loss"])
    trainable = [p for p in t.coprocessor.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(not torch.equal(v, t.coprocessor.trainable_state()[k]) for k, v in before.items())


def test_precision_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        _cfg(tmp_path, precision="fp8").validate()


def test_bf16_on_a_cpu_without_bf16_instructions_is_said(tmp_path, corpus):
    from cacheaug_engine.device import slow_bf16_note
    from cacheaug_engine.train.trainer import Trainer

    cpu = torch.device("cpu")
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (slow_bf16_note(cpu, torch.bfloat16) is not None) == emulated
    assert slow_bf16_note(cpu, None) is None and slow_bf16_note(torch.device("cuda"), torch.bfloat16) is None
    said: list[str] = []
    Trainer(_cfg(tmp_path, precision="bf16"), decoder=tiny_decoder("llama"), corpus=corpus, log=said.append)
    assert any("no bf16 instructions" in s for s in said) == emulated


def test_init_from_may_switch_shift_tokens_and_records_it(tmp_path, corpus):
    """--no-shift-tokens with --init-from fine-tunes a shifted checkpoint for unshifted positions (the
    tensors keep their meaning); unset, the checkpoint's setting is kept; either way it is saved."""
    _run(_cfg(tmp_path, steps=1), corpus)
    src = str(tmp_path / "run" / "checkpoint")
    moved = _run(_cfg(tmp_path / "b", steps=1, init_from=src, shift_tokens=False), corpus)
    assert moved.coprocessor.shift_tokens is False
    saved = load_checkpoint(tmp_path / "b" / "run" / "checkpoint")
    assert saved.coprocessor_config["shift_tokens"] is False
    kept = _run(_cfg(tmp_path / "c", steps=1, init_from=str(tmp_path / "b" / "run" / "checkpoint")), corpus)
    assert kept.coprocessor.shift_tokens is False
