"""The augmentation front of ``cacheaug serve`` (issue 27) against a stand-in engine: real HTTP on
127.0.0.1, no vLLM needed. (The end-to-end server with vLLM: tests/serving/test_vllm_serve.py.)"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.cli.main import main
from cacheaug_engine.integrations.vllm_prompts import PromptAugmenter
from cacheaug_engine.integrations.vllm_server import AugmentFront, make_front_server


class Engine(BaseHTTPRequestHandler):
    """Stand-in for vLLM's server: records each body and answers JSON (or a 3-event stream)."""

    protocol_version = "HTTP/1.1"
    seen: list[bytes] = []
    healthy = True

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        ok = self.path == "/health" and Engine.healthy
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        Engine.seen.append(raw)
        if json.loads(raw).get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                ev = f"data: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            self.wfile.write(b"0\r\n\r\n")
            return
        data = json.dumps({"id": "x", "choices": [{"text": "ok"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class SlowAugmenter(PromptAugmenter):
    delay = 0.0

    def prompt_embeds(self, prompts):
        time.sleep(self.delay)
        return super().prompt_embeds(prompts)


def _serve(server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


@pytest.fixture()
def stack():
    Engine.seen, Engine.healthy = [], True
    engine = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    _serve(engine)
    dec = tiny_decoder("llama")
    aug = SlowAugmenter(dec, Coprocessor(dec, 3, lora_rank=2, placement="early", seed=1))
    front = AugmentFront(aug, lambda text: [ord(c) % 256 for c in text], f"http://127.0.0.1:{engine.server_address[1]}",
                         deadline_s=30.0)
    server = make_front_server(front)
    _serve(server)
    yield front, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    front.close()
    engine.shutdown()
    engine.server_close()


def _post(url: str, body: dict, path: str = "/v1/completions") -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_plain_request_passes_through_untouched(stack) -> None:
    front, url = stack
    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    status, headers, doc = _post(url, body)
    assert status == 200 and doc == {"id": "x", "choices": [{"text": "ok"}]}
    assert Engine.seen == [json.dumps(body).encode()] and "X-Cacheaug-Augmented" not in headers


def test_augmented_request_carries_the_rows_as_prompt_embeds(stack) -> None:
    front, url = stack
    status, headers, doc = _post(url, {"model": "m", "prompt": "hello", "max_tokens": 3, "augment": True})
    assert status == 200 and headers["X-Cacheaug-Augmented"] == "true"
    assert doc["cacheaug"]["augmented"] is True and doc["choices"] == [{"text": "ok"}]
    sent = json.loads(Engine.seen[0])
    assert "prompt" not in sent and "augment" not in sent and sent["max_tokens"] == 3
    rows = torch.load(io.BytesIO(base64.b64decode(sent["prompt_embeds"])), weights_only=True)
    want = front.augmenter.prompt_embeds([[ord(c) for c in "hello"]])[0]
    assert torch.equal(rows, want) and rows.shape == (5 + 3, 128)
    # a list of prompts -> a list of embeddings; augment: false -> the field removed, reported plain
    _post(url, {"model": "m", "prompt": ["ab", "cd"], "augment": True})
    assert len(json.loads(Engine.seen[1])["prompt_embeds"]) == 2
    status, headers, doc = _post(url, {"model": "m", "prompt": "hi", "augment": False})
    assert headers["X-Cacheaug-Augmented"] == "false" and json.loads(Engine.seen[2]) == {"model": "m", "prompt": "hi"}
    assert front.stats.augmented == 2 and front.stats.plain == 1


def test_latents_past_the_deadline_are_served_plain_and_plain_requests_never_wait(stack) -> None:
    front, url = stack
    front.augmenter.delay, front.deadline_s = 2.0, 0.2
    t0 = time.perf_counter()
    status, headers, doc = _post(url, {"model": "m", "prompt": "slow", "augment": True})
    assert time.perf_counter() - t0 < 1.5  # it did not wait for the coprocessor
    assert headers["X-Cacheaug-Augmented"] == "false" and "deadline" in doc["cacheaug"]["reason"]
    assert json.loads(Engine.seen[0])["prompt"] == "slow" and front.stats.fell_back == 1
    # while the coprocessor is busy (2 s), an augmented request waits for it; a plain one does not
    front.deadline_s = 30.0
    done: dict[str, float] = {}

    def aug() -> None:
        _post(url, {"model": "m", "prompt": "slower", "augment": True})
        done["aug"] = time.perf_counter()

    t0 = time.perf_counter()
    th = threading.Thread(target=aug)
    th.start()
    time.sleep(0.2)
    _post(url, {"model": "m", "prompt": "plain"})
    done["plain"] = time.perf_counter()
    th.join(60)
    assert done["plain"] - t0 < 1.5 < done["aug"] - t0
    # the first request's latents were computed anyway and cached: the same prompt is augmented at once
    front.augmenter.delay = 0.0
    assert _post(url, {"model": "m", "prompt": "slow", "augment": True})[1]["X-Cacheaug-Augmented"] == "true"


def test_bad_augment_requests_get_400(stack) -> None:
    front, url = stack
    assert _post(url, {"model": "m", "prompt": "x", "augment": "yes"})[0] == 400
    status, _, doc = _post(url, {"model": "m", "prompt": [1, 2], "augment": True})
    assert status == 400 and "prompt" in doc["error"]["message"]
    assert Engine.seen == []


def test_health_and_stream_relay(stack) -> None:
    import urllib.error
    import urllib.request

    front, url = stack
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        doc = json.loads(r.read())
    assert r.status == 200 and doc["status"] == "ok" and doc["coprocessor"]["num_latents"] == 3
    Engine.healthy = False
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url + "/health", timeout=30)
    assert info.value.code == 503
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": "s", "stream": True,
                                 "augment": True}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["X-Cacheaug-Augmented"] == "true"
        assert r.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_serve_cli_checks_its_arguments_first(tmp_path, capsys) -> None:
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--coprocessor", str(tmp_path / "none")]) == 2
    assert "--coprocessor" in capsys.readouterr().err
