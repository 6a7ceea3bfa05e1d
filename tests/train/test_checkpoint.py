"""Reliability suite, checkpoints and the trainer's numbers: the save order never leaves nothing
loadable, stale temp dirs of dead processes go, a full disk keeps the previous checkpoint (real
tmpfs where mounting works, and an injected ENOSPC), and a non-finite loss stops training with
one clear error, keeping the last good checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_setup import assert_one_error, run_cli, write_tiny_setup

from cacheaug_engine.train import checkpoint as ckpt_mod
from cacheaug_engine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _save(path: Path, step: int) -> Path:
    return save_checkpoint(
        path, coprocessor={"w": torch.full((4,), float(step))}, state={"step": step},
        optimizer_tensors={"0.m": torch.zeros(2)},
    )


def test_save_order_keeps_old_until_new_is_in_place(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    _save(path, 1)
    events: list[tuple[str, str]] = []
    real_replace, real_rmtree, real_fsync_dir = os.replace, shutil.rmtree, ckpt_mod.fsync_dir

    def replace(src, dst):
        events.append(("replace", f"{Path(src).name}->{Path(dst).name}"))
        return real_replace(src, dst)

    def rmtree(p, *a, **k):
        events.append(("rmtree", Path(p).name))
        return real_rmtree(p, *a, **k)

    def fsync_dir(p, **kw):
        events.append(("fsync", Path(p).name))
        return real_fsync_dir(p, **kw)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    monkeypatch.setattr(ckpt_mod, "fsync_dir", fsync_dir)
    _save(path, 2)
    tmp = f".ck.tmp-{os.getpid()}"
    assert events == [
        ("fsync", tmp),  # the new files are durable before anything is renamed
        ("replace", "ck->.ck.old"),
        ("replace", f"{tmp}->ck"),
        ("fsync", tmp_path.name),
        ("rmtree", ".ck.old"),  # the old copy goes only after the new one is in place
    ]
    assert load_checkpoint(path).state["step"] == 2


def test_crash_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    _save(path, 1)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".ck.tmp-"):
            raise KeyboardInterrupt  # the process dies after current -> .old, before temp -> current
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2)
    assert not path.exists() and (tmp_path / ".ck.old").is_dir()
    assert load_checkpoint(path).state["step"] == 1
    # The next save must not delete .old (the only complete copy) before its own is in place.
    with pytest.raises(KeyboardInterrupt):
        _save(path, 3)
    assert load_checkpoint(path).state["step"] == 1
    monkeypatch.undo()
    _save(path, 4)  # and a working save recovers: new checkpoint, .old and stale temps gone
    assert load_checkpoint(path).state["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    path = tmp_path / "ck"
    dead = tmp_path / f".ck.tmp-{_dead_pid()}"
    alive = tmp_path / f".ck.tmp-{os.getppid()}"  # our parent: a live process that may be writing
    other = tmp_path / ".ck.tmp-notapid"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "coprocessor.safetensors").write_bytes(b"partial")
    _save(path, 1)
    assert not dead.exists() and alive.exists() and other.exists()
    assert load_checkpoint(path).state["step"] == 1


def test_missing_optimizer_is_an_error_naming_the_file(tmp_path):
    path = _save(tmp_path / "ck", 1)
    save_checkpoint(path, coprocessor={"w": torch.ones(1)}, state={"step": 1, "optimizer": {"param_groups": []}},
                    optimizer_tensors={"0.m": torch.zeros(1)})
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ck/optimizer\.safetensors: missing"):
        load_checkpoint(path)
    assert load_checkpoint(path, with_optimizer=False).state["step"] == 1  # eval/generate need no optimizer


@pytest.mark.parametrize(
    "how,file,needle",
    [("state", "state.json", "unreadable"), ("copro", "coprocessor.safetensors", "unreadable safetensors"),
     ("optim", "optimizer.safetensors", "unreadable safetensors")],
)
def test_corrupt_files_are_named(tmp_path, how, file, needle):
    path = tmp_path / "ck"
    save_checkpoint(path, coprocessor={"w": torch.ones(8)}, state={"step": 1, "optimizer": {"param_groups": []}},
                    optimizer_tensors={"0.m": torch.zeros(8)})
    f = path / file
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{f}: ") and needle in str(e.value)


@pytest.fixture()
def tiny(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("tiny")
    monkeypatch.setenv("CACHEAUG_CACHE", str(d / "cache"))
    return write_tiny_setup(d)


def _assert_survived(out: Path, step: int) -> None:
    ck = load_checkpoint(out / "checkpoint")
    assert ck.state["step"] == step
    assert all(torch.isfinite(t).all() for t in ck.coprocessor.values())
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def _enospc_at_save(monkeypatch, fail_on_call: int) -> None:
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= fail_on_call:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)


def test_full_disk_injected_enospc(tiny, tmp_path, capsys, monkeypatch):
    """ENOSPC during the second save (step 2): previous checkpoint survives, one line, no temp dir."""
    out = tmp_path / "run"
    _enospc_at_save(monkeypatch, fail_on_call=3)  # call 1, 2 = step 1's coprocessor + optimizer files
    code, err = run_cli(["train", *tiny, "--steps", "3", "--save-every", "1", "--out", str(out)], capsys)
    assert_one_error(code, err, "No space left on device", "coprocessor.safetensors", "cannot write checkpoint")
    _assert_survived(out, 1)


def _mount_tmpfs(where: Path, size: int) -> bool:
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_full_disk_tmpfs(tiny, tmp_path, capsys):
    """A real full disk: a tmpfs with room for one checkpoint but not for a second beside it.
    Where mounting is not allowed (unprivileged containers) it skips, saying so: the injected
    ENOSPC of test_full_disk_injected_enospc is then the only full-disk check."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, 1 << 20):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): no real full disk to test")
    subprocess.run(["umount", str(mnt)], check=True)
    probe = tmp_path / "probe"
    code, _ = run_cli(["train", *tiny, "--steps", "1", "--out", str(probe)], capsys)
    assert code == 0
    one = sum(f.stat().st_size for f in (probe / "checkpoint").iterdir())
    pages = -(-one // 4096) + 3  # a page per file plus slack: room for one checkpoint, not two
    assert _mount_tmpfs(mnt, pages * 4096 + 4096)
    try:
        out = mnt / "run"
        code, err = run_cli(["train", *tiny, "--steps", "3", "--save-every", "1", "--out", str(out)], capsys)
        assert_one_error(code, err, "No space left on device", "cannot write checkpoint")
        _assert_survived(out, 1)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_nonfinite_loss_stops_without_writing_a_checkpoint(tiny, tmp_path, capsys):
    """A real non-finite loss (latents scaled by 3e38 overflow to inf in the decoder): stopped at step 1
    before the optimizer step, one line naming the step, exit 1, no checkpoint written."""
    out = tmp_path / "run"
    argv = ["train", *tiny, "--steps", "3", "--save-every", "1", "--scale-init", "3e38", "--scale-mode", "fixed",
            "--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, "step 1: non-finite loss", "no checkpoint was written", exit_code=1)
    assert not (out / "checkpoint").exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_nonfinite_grad_norm_keeps_last_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """An inf gradient norm at step 3 (injected: a real one depends on the data split): stopped before
    the optimizer step, the step-2 checkpoint kept with finite weights, exit 1."""
    import cacheaug_engine.train.trainer as train_mod

    real = train_mod.grad_norm
    calls = {"n": 0}

    def grad_norm(params, clip):
        calls["n"] += 1
        g = real(params, clip)
        return float("inf") if calls["n"] == 3 else g

    monkeypatch.setattr(train_mod, "grad_norm", grad_norm)
    out = tmp_path / "run"
    argv = ["train", *tiny, "--steps", "5", "--save-every", "1", "--clip", "0", "--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert_one_error(code, err, "step 3", "gradient norm (inf)", "last good checkpoint (step 2)", exit_code=1)
    _assert_survived(out, 2)


def test_huge_lr_rejected_before_training(tiny, tmp_path, capsys):
    code, err = run_cli(["train", *tiny, "--lr", "1e38", "--out", str(tmp_path / "r")], capsys)
    assert_one_error(code, err, "lr (--lr)", "<= 1e+06")


@pytest.mark.parametrize("complete", ["state.json", "COMPLETE"])
def test_swap_in_keeps_old_after_an_interrupted_swap(tmp_path, monkeypatch, complete):
    """The one swap both checkpoint formats use (plain: state.json, distributed: the COMPLETE
    marker): after a crash between the renames only `.old` is complete; the next save must not
    delete it before the new checkpoint is in place."""
    import os

    from cacheaug_engine.train.checkpoint import swap_in

    path, old, tmp = tmp_path / "ck", tmp_path / ".ck.old", tmp_path / ".ck.tmp"
    old.mkdir()
    (old / complete).write_text("ok")  # the last good checkpoint, `path` itself is missing
    tmp.mkdir()
    (tmp / complete).write_text("new")
    real_replace = os.replace

    def crash_on_new(src, dst):
        if os.fspath(src) == os.fspath(tmp):
            raise OSError("simulated crash before the new checkpoint is in place")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_new)
    with pytest.raises(OSError, match="simulated crash"):
        swap_in(tmp, path, complete=complete)
    assert (old / complete).read_text() == "ok"  # still loadable
    monkeypatch.setattr(os, "replace", real_replace)
    swap_in(tmp, path, complete=complete)
    assert (path / complete).read_text() == "new" and not old.exists()
