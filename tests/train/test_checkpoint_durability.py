"""Durability of checkpoint saves (issue 28): every file is fsynced at its final size before the
directory swap, the temp directory's entries before the swap, the parent after it, and the old copy
goes only then - for plain checkpoints (train/checkpoint.py), their export, and distributed ones
(train/dist_checkpoint.py, one gloo rank in this process). A kill -9 cannot show a missing fsync;
the logged os.fsync calls can."""

from __future__ import annotations

import os

import pytest
import torch
from disk_log import DiskLog
from dist_single import one_rank_group, write_dist_checkpoint

from cacheaug_engine.fileio import write_json
from cacheaug_engine.train.checkpoint import export_coprocessor, load_checkpoint, save_checkpoint
from cacheaug_engine.train.dist_checkpoint import MARKER, STATE_FILE, export_dist_checkpoint, read_train_state


def _save(path, step: int, optimizer: bool = True):
    return save_checkpoint(
        path, coprocessor={"w": torch.full((64,), float(step))}, state={"step": step},
        optimizer_tensors={"0.m": torch.zeros(32)} if optimizer else None,
    )  # fmt: skip


@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace"])
@pytest.mark.parametrize("optimizer", [True, False], ids=["with_optimizer", "coprocessor_only"])
def test_plain_checkpoint_files_fsynced_before_swap(tmp_path, monkeypatch, replace, optimizer):
    path = tmp_path / "ck"
    if replace:
        _save(path, 1)
    log = DiskLog(monkeypatch)
    _save(path, 2, optimizer)
    log.assert_durable_swap(path)
    names = {"coprocessor.safetensors", "state.json"} | ({"optimizer.safetensors"} if optimizer else set())
    assert {p.name for p in path.iterdir()} == names
    tmp = next(e[1] for e in log.events if e[0] == "rename" and e[2] == os.path.realpath(path))
    for name in names:  # each file exactly once: one fsync per file, none skipped or repeated
        assert len(log.fsyncs_of(os.path.join(tmp, name))) == 1, name
    if replace:
        old = os.path.realpath(tmp_path / ".ck.old")
        assert log.index("rename", os.path.realpath(path), old) < log.index("rename", tmp)
        assert log.index("rmtree", old) is not None and not (tmp_path / ".ck.old").exists()
    assert load_checkpoint(path).state["step"] == 2


def test_export_is_durable(tmp_path, monkeypatch):
    src = _save(tmp_path / "ck", 3)
    log = DiskLog(monkeypatch)
    export_coprocessor(src, tmp_path / "exported", dtype=torch.bfloat16)
    log.assert_durable_swap(tmp_path / "exported")


def test_distributed_checkpoint_files_fsynced_before_swap(tmp_path, monkeypatch):
    """Shards, .metadata (written as .metadata.tmp then renamed), train_state.json and COMPLETE:
    all fsynced before the swap; COMPLETE last, after a directory fsync that makes the others'
    entries durable; replacing an existing checkpoint."""
    path = tmp_path / "checkpoint-dist"
    with one_rank_group():
        write_dist_checkpoint(path, steps=(1,))
        log = DiskLog(monkeypatch)
        write_dist_checkpoint(path, steps=(2,))
    log.assert_durable_swap(path)
    names = {p.name for p in path.iterdir()}
    assert {MARKER, STATE_FILE, ".metadata"} <= names and any(n.endswith(".distcp") for n in names)
    tmp = next(e[1] for e in log.events if e[0] == "rename" and e[2] == os.path.realpath(path))
    marker = max(i for i, _ in log.fsyncs_of(os.path.join(tmp, MARKER)))
    others = max(i for i, e in enumerate(log.events) if e[0] == "fsync" and e[1].startswith(tmp + os.sep)
                 and not e[1].endswith(MARKER))  # fmt: skip
    assert any(others < i < marker for i, _ in log.fsyncs_of(tmp)), "COMPLETE written before the others were durable"
    assert read_train_state(path).state["step"] == 2


def test_dist_export_is_durable(tmp_path, monkeypatch):
    with one_rank_group():
        src = write_dist_checkpoint(tmp_path / "checkpoint-dist")
    log = DiskLog(monkeypatch)
    export_dist_checkpoint(src, tmp_path / "coprocessor")
    log.assert_durable_swap(tmp_path / "coprocessor")


def test_write_json_is_durable(tmp_path, monkeypatch):
    """Results (eval.json, report.json): the file fsynced at its size before the rename, the directory
    after it (fileio's docstring)."""
    log = DiskLog(monkeypatch)
    out = write_json({"a": list(range(50))}, tmp_path / "r.json")
    rename = log.index("rename", os.path.realpath(tmp_path / f".r.json.tmp{os.getpid()}"), os.path.realpath(out))
    assert rename is not None
    syncs = log.fsyncs_of(os.path.realpath(tmp_path / f".r.json.tmp{os.getpid()}"))
    assert syncs and syncs[-1][0] < rename and syncs[-1][1] == out.stat().st_size
    assert any(i > rename for i, _ in log.fsyncs_of(os.path.realpath(tmp_path))), "directory not fsynced"
