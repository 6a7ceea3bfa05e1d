"""``cacheaug serve`` end to end (issue 27; marker ``vllm``): the real vLLM OpenAI server behind our front,
real HTTP requests to 127.0.0.1, then a clean shutdown that leaves no engine process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from cacheaug_engine.generation import generate  # noqa: E402
from cacheaug_engine.integrations.vllm import load_augmenter  # noqa: E402
from cacheaug_engine.integrations.vllm_server import free_port, group_alive, wait_ready  # noqa: E402

N_NEW = 8


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        doc = json.loads(r.read())
        doc["_augmented_header"] = r.headers.get("X-Cacheaug-Augmented")
        return doc


def test_serve_augmented_and_plain_over_http(tiny_dir, tmp_path: Path) -> None:
    model_dir, ckpt = tiny_dir
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "cacheaug_engine.cli", "serve", "--model", str(model_dir), "--coprocessor", str(ckpt),
           "--port", str(port), "--max-model-len", "128", "--deadline-s", "120", "--engine-log",
           str(tmp_path / "engine.log")]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine_pid = None
    try:
        try:
            wait_ready(f"{url}/health", proc, 400)
        except RuntimeError:
            pytest.fail(f"server did not start:\n{(tmp_path / 'serve.log').read_text()[-3000:]}\n"
                        f"{(tmp_path / 'engine.log').read_text()[-3000:]}")
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            health = json.loads(r.read())
        engine, engine_pid = health["engine"], health["engine_pid"]
        assert health["status"] == "ok" and engine.startswith("http://127.0.0.1:")
        base = {"model": str(model_dir), "max_tokens": N_NEW, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        prompts = ["ab ab 12", "hello"]
        aug = _post(url, {**base, "prompt": prompts, "augment": True})
        plain = _post(url, {**base, "prompt": prompts})
        bare = _post(engine, {**base, "prompt": prompts})  # vLLM without our front
        assert aug["cacheaug"]["augmented"] is True and aug["_augmented_header"] == "true"
        assert "cacheaug" not in plain and plain["_augmented_header"] is None
        got_aug = [c["token_ids"] for c in sorted(aug["choices"], key=lambda c: c["index"])]
        got_plain = [c["token_ids"] for c in sorted(plain["choices"], key=lambda c: c["index"])]
        assert got_plain == [c["token_ids"] for c in sorted(bare["choices"], key=lambda c: c["index"])]
        # our own generate on the same decoder, coprocessor and token ids
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        rows = [list(tok.encode(p)) for p in prompts]
        a = load_augmenter(model_dir, ckpt)
        ours_aug = generate(a.decoder, rows, coprocessor=a.coprocessor, augmented=True, max_new_tokens=N_NEW).tokens
        ours_plain = generate(a.decoder, rows, augmented=False, max_new_tokens=N_NEW).tokens
        assert got_aug == ours_aug and got_plain == ours_plain and got_aug != got_plain
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        engine_left = engine_pid is not None and group_alive(engine_pid)
        for pid in (proc.pid, engine_pid):  # whatever a failed shutdown left behind
            if pid is not None and group_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "cacheaug serve: stopped" in (tmp_path / "serve.log").read_text()
    assert "did not exit" not in (tmp_path / "serve.log").read_text()
    assert engine_pid is not None and not engine_left  # the engine and its workers are gone with the front
