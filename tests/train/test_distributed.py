"""Distributed training on the CPU (gloo): torchrun ddp / fsdp vs one process, world-size changes on
resume, sharded checkpoint atomicity and export, a dead rank. Tiny random model, bytes tokenizer.

The 2-process runs use ``python -m torch.distributed.run`` (torchrun) with the same Python that
runs the tests, so the package under test is the one imported by the workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_single import one_rank_group, write_dist_checkpoint
from model_fixtures import tiny_config

from cacheaug_engine.cli.main import main
from cacheaug_engine.train.checkpoint import CheckpointError, load_checkpoint
from cacheaug_engine.train.dist_checkpoint import MARKER, export_dist_checkpoint, read_coprocessor_tensors
from cacheaug_engine.train.distributed import DistContext, describe_failure, init_distributed, is_collective_failure

TEXT = "\n\n".join(f"Line {i}: cache augmentation appends latent embeddings to the KV cache." for i in range(300))
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    cfg = d / "tiny.json"
    c = tiny_config("llama")
    c.vocab_size = 259  # the byte tokenizer's vocabulary
    cfg.write_text(json.dumps(c.to_dict()))
    (d / "text.txt").write_text(TEXT)
    common = [
        "--model", f"random:{cfg}", "--data", str(d / "text.txt"), "--seq-len", "40", "--num-latents", "2",
        "--ahead", "3", "--positions", "4", "--lora-rank", "2", "--no-progress", "--heldout-frac", "0.2",
        "--device", "cpu", "--threads", "1", "--steps", "4", "--grad-accum", "2", "--lr", "5e-3", "--warmup", "1",
    ]  # fmt: skip
    env = {**os.environ, "CACHEAUG_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1"}
    return d, common, env


@pytest.fixture(scope="module")
def reference(setup):
    """Plain single-process `cacheaug train`, global batch 4 x 2 accumulation steps, 4 steps."""
    d, common, env = setup
    out = d / "ref"
    old = os.environ.get("CACHEAUG_CACHE")
    os.environ["CACHEAUG_CACHE"] = env["CACHEAUG_CACHE"]
    try:
        assert main(["train", *common, "--batch-size", "4", "--out", str(out)]) == 0
    finally:
        os.environ.pop("CACHEAUG_CACHE") if old is None else os.environ.__setitem__("CACHEAUG_CACHE", old)
    return json.loads((out / "checkpoint" / "state.json").read_text())["history"]


def _torchrun(nproc: int, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "cacheaug_engine.cli", "train", *args]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_history(out: Path) -> list[dict]:
    return json.loads((out / "checkpoint-dist" / "train_state.json").read_text())["history"]


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in ("loss", "baseline", "pos1", "grad_norm"))


def test_fsdp_two_ranks_then_resume_on_one(setup, reference):
    """fsdp on 2 ranks (batch 2 each, activation checkpointing on) for 2 steps, resumed on 1 rank
    (batch 4) for steps 3-4: the whole history equals one plain process on the same global batch.
    A held-out eval right before the save (a forward without backward) must not disturb it."""
    d, common, env = setup
    out = d / "fsdp"
    args = ["--batch-size", "2", "--distributed", "fsdp", "--grad-checkpoint", "--eval-every", "2", "--eval-seqs", "2"]
    r = _torchrun(2, [*common, *args, "--stop-after", "2", "--out", str(out)], env)
    assert r.stdout.count("held-out eval at step 2") == 1
    assert r.stdout.count("done: 2 steps") == 1  # rank 0 alone reports
    assert "memory per rank (fsdp, 2 ranks, gloo)" in r.stdout
    st = json.loads((out / "checkpoint-dist" / "train_state.json").read_text())
    assert (st["step"], st["world_size"], st["global_batch"]) == (2, 2, 4)
    assert len(list((out / "checkpoint-dist").glob("*.distcp"))) == 2  # one shard file per rank
    _torchrun(1, [*common, "--batch-size", "4", "--distributed", "fsdp", "--resume", "--out", str(out)], env)
    hist = _dist_history(out)
    assert len(hist) == 4
    assert _max_diff(reference, hist) < TOL
    # the exported single-directory coprocessor loads like any checkpoint, with the final tensors
    ck = load_checkpoint(out / "coprocessor", with_optimizer=False)
    assert ck.state["step"] == 4 and ck.coprocessor_config["lora_rank"] == 2
    ref_ck = load_checkpoint(d / "ref" / "checkpoint", with_optimizer=False)
    for k, v in ref_ck.coprocessor.items():
        torch.testing.assert_close(ck.coprocessor[k], v, atol=1e-5, rtol=1e-4)


def test_ddp_one_rank_then_resume_on_two(setup, reference, capsys, monkeypatch):
    """ddp on 1 rank (batch 4) for 2 steps, resumed on 2 ranks (batch 2 each): same history; the
    global batch must match on resume; `cacheaug export` writes what `cacheaug eval` reads."""
    d, common, env = setup
    out = d / "ddp"
    _torchrun(1, [*common, "--batch-size", "4", "--distributed", "ddp", "--stop-after", "2", "--out", str(out)], env)
    # a resume with another global batch is refused before any model load (world of 1, in this process)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        assert main(["train", *common, "--batch-size", "3", "--distributed", "ddp", "--resume", "--out", str(out)]) == 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert "global batch 3 != checkpoint's 4" in capsys.readouterr().err
    _torchrun(2, [*common, "--batch-size", "2", "--distributed", "ddp", "--resume", "--out", str(out)], env)
    hist = _dist_history(out)
    assert len(hist) == 4
    assert _max_diff(reference, hist) < TOL
    dst = d / "exported"
    assert main(["export", str(out / "checkpoint-dist"), str(dst), "--dtype", "bf16"]) == 0
    ck = load_checkpoint(dst, with_optimizer=False)
    assert all(v.dtype == torch.bfloat16 for v in ck.coprocessor.values())
    capsys.readouterr()
    eval_args = ["eval", str(dst), "--tokenizer", "bytes", "--eval-seqs", "2", "--device", "cpu"]
    assert main([*eval_args, "--out", str(d / "ev")]) == 0
    assert (d / "ev" / "eval.json").is_file()


@pytest.mark.parametrize(
    "sig, timeout",
    [(signal.SIGKILL, 20), pytest.param(signal.SIGSTOP, 10, marks=pytest.mark.slow)],
    ids=["killed", "stopped"],
)
def test_dead_rank_makes_the_other_exit(setup, sig, timeout):
    """Rank 1 is SIGKILLed (or SIGSTOPped: alive but silent) mid-run: rank 0 exits non-zero with one
    clear error line within --dist-timeout (+ slack for the stopped case) instead of hanging.
    Launched without torchrun's agent (which would kill the survivors itself), so what is measured
    is the trainer's own behaviour."""
    d, common, env = setup
    out = d / f"kill-{sig.name}"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        e = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port}  # fmt: skip
        args = [*common, "--steps", "500", "--batch-size", "2", "--distributed", "ddp", "--save-every", "1",
                "--dist-timeout", str(timeout), "--out", str(out)]  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "cacheaug_engine.cli", "train", *args], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-dist" / MARKER).exists():  # a step has completed on both ranks
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.1)
        t0 = time.monotonic()
        procs[1].send_signal(sig)
        _, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("cacheaug: error: rank 0: a collective failed: another rank died"), err[-2000:]
    if sig == signal.SIGKILL:
        assert waited < timeout  # the peer's socket closes: no need to wait for the timeout
    else:
        assert "Timed out" in last and timeout - 1 < waited < timeout + 30
    # the checkpoint left behind is complete and loads
    assert read_coprocessor_tensors(out / "checkpoint-dist")


def test_incomplete_checkpoint_never_loads(tmp_path):
    """A save interrupted before COMPLETE: the directory is refused; the .old copy of an
    interrupted swap is used instead. The checkpoint is written here by one gloo rank, so the test
    runs alone too (it used to skip without the fsdp run's checkpoint)."""
    import shutil

    with one_rank_group():
        src = write_dist_checkpoint(tmp_path / "src" / "checkpoint-dist")
    assert (src / MARKER).is_file()

    broken = tmp_path / "checkpoint-dist"
    shutil.copytree(src, broken)
    (broken / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete distributed checkpoint"):
        export_dist_checkpoint(broken, tmp_path / "x")
    shutil.copytree(src, tmp_path / ".checkpoint-dist.old")
    shutil.rmtree(broken)  # crash between the two renames: only .old exists
    assert export_dist_checkpoint(broken, tmp_path / "y").is_dir()


def test_errors_without_torchrun(monkeypatch, tmp_path, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        init_distributed("ddp")
    with pytest.raises(ValueError, match="distributed must be one of"):
        init_distributed("zero3")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config("llama").to_dict()))
    rc = main(["train", "--model", f"random:{cfg}", "--distributed", "ddp", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cacheaug: error: --distributed ddp needs torchrun")
    assert main(["train", "--distributed", "ddp", "--dist-timeout", "0", "--out", str(tmp_path / "o")]) == 2
    assert "dist_timeout (--dist-timeout): expected a number > 0" in capsys.readouterr().err
    assert main(["demo", "--distributed", "fsdp", "--out", str(tmp_path / "o")]) == 2
    assert "the demo runs in one process" in capsys.readouterr().err


def test_shard_and_failure_classification():
    ctx = DistContext("ddp", 1, 2, 1, torch.device("cpu"), "gloo", 5.0)
    batch = torch.arange(8).view(4, 2)
    assert ctx.shard(batch).tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        ctx.shard(torch.zeros(3, 2))
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    assert is_collective_failure(gloo)
    assert not is_collective_failure(RuntimeError("shape mismatch in matmul"))
    assert "--dist-timeout 5 s" in describe_failure(gloo, 5.0)
