"""``cacheaug serve``: vLLM's OpenAI-compatible server with our augmentation front before it.

    client -> front (127.0.0.1:PORT, this module) -> vLLM's OpenAI server (127.0.0.1, a private port)

vLLM runs as its own process (``python -m vllm.entrypoints.openai.api_server --enable-prompt-embeds``;
``vllm serve`` does not start from the ``vllm-cpu`` distribution), so the front depends on vLLM's
command line and HTTP API only, not on its internals. The front (standard-library HTTP server, one
thread per request):

* ``POST /v1/completions`` with ``"augment": true``: the prompt (a string, or a list of strings) is
  tokenized as vLLM tokenizes it, the coprocessor computes its latents on its own worker thread, and
  the request goes on with ``prompt_embeds`` (the prompt's input embeddings then the latents,
  ``torch.save``d and base64-encoded: vLLM's format) in place of ``prompt``. If the latents are not
  ready within the deadline (``--deadline-s``) the request is served plain - the decoder works
  unchanged without the coprocessor - and the latents, still computed, are cached for the next time.
  The response says which it got: the header ``X-Cacheaug-Augmented: true|false`` and, for a JSON
  response, a top-level ``"cacheaug": {"augmented": ..., "reason": ..., "latents_ms": ...}``.
* Every other request (plain completions, chat, models, tokenize, metrics, ...) passes through
  untouched (``"augment": false`` is removed first); plain requests never wait for the coprocessor.
* ``GET /health``: 200 when the engine answers its own /health, else 503; JSON with the upstream URL
  and the coprocessor's counters.

Nothing here imports vLLM (the engine is a subprocess); :func:`start_vllm` checks it is installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from cacheaug_engine.integrations.vllm_prompts import PromptAugmenter

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection",
               "te", "trailer", "upgrade"}
MAX_BODY = 64 * 2**20  # bytes of a request body the front reads


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def encode_embeds(rows: torch.Tensor) -> str:
    """vLLM's wire format for prompt embeddings: base64 of ``torch.save`` of a [S, d] tensor (a fresh
    copy: ``torch.save`` of a view writes its whole storage)."""
    buf = io.BytesIO()
    torch.save(rows.detach().cpu().contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class FrontStats:
    """Counters of the front (reported by /health)."""

    augmented: int = 0
    fell_back: int = 0  # asked for augmentation, served plain (deadline or coprocessor error)
    plain: int = 0


class AugmentFront:
    """The augmentation front's logic, independent of the HTTP server that carries it.

    Args:
        augmenter: our decoder + coprocessor.
        encode: text -> token ids exactly as the engine tokenizes a text prompt.
        upstream: the engine's base URL (``http://127.0.0.1:PORT``).
        deadline_s: seconds an augmented request waits for its latents before it is served plain.
    """

    def __init__(self, augmenter: PromptAugmenter, encode: Callable[[str], list[int]], upstream: str,
                 deadline_s: float = 10.0) -> None:
        if not deadline_s >= 0:
            raise ValueError(f"deadline_s: expected seconds >= 0, got {deadline_s!r}")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream: expected http://HOST:PORT, got {upstream!r}")
        self.augmenter = augmenter
        self.encode = encode
        self.upstream = upstream.rstrip("/")
        self.host, self.port = parts.hostname, parts.port
        self.deadline_s = float(deadline_s)
        self.stats = FrontStats()
        self.engine_pid: int | None = None  # set by serve(): the engine's process (group) id, reported by /health
        self._lock = threading.Lock()
        # one worker: the coprocessor runs off the request threads, one batch at a time
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cacheaug-coprocessor")

    def rewrite(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the body to send on, what the response should report) for a /v1/completions request."""
        want = body.pop("augment", False)
        if not isinstance(want, bool):
            raise ValueError(f"augment: expected true or false, got {want!r}")
        if not want:
            with self._lock:
                self.stats.plain += 1
            return body, {"augmented": False, "reason": "not requested"}
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("prompt: an augmented request needs a non-empty string or a list of them")
        if "prompt_embeds" in body:
            raise ValueError("prompt_embeds: an augmented request sends text; the front computes the embeddings")
        t0 = time.perf_counter()
        future = self.worker.submit(self.augmenter.prompt_embeds, [self.encode(t) for t in texts])
        try:
            rows = future.result(timeout=self.deadline_s)
        except FutureTimeout:
            with self._lock:
                self.stats.fell_back += 1
            why = f"latents not ready within the deadline ({self.deadline_s:g} s)"
            return body, {"augmented": False, "reason": why}
        except Exception as e:  # noqa: BLE001 - the decoder serves plain without the coprocessor
            with self._lock:
                self.stats.fell_back += 1
            return body, {"augmented": False, "reason": f"coprocessor failed: {type(e).__name__}: {e}"}
        ms = round(1000 * (time.perf_counter() - t0), 2)
        out = {k: v for k, v in body.items() if k != "prompt"}
        enc = [encode_embeds(r) for r in rows]
        out["prompt_embeds"] = enc[0] if isinstance(prompt, str) else enc
        with self._lock:
            self.stats.augmented += 1
        return out, {"augmented": True, "reason": "latents", "latents_ms": ms}

    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, JSON) of /health: 200 when the engine's own /health answers 200."""
        try:
            with urllib.request.urlopen(f"{self.upstream}/health", timeout=5) as r:
                ok = r.status == 200
        except (urllib.error.URLError, OSError):
            ok = False
        a = self.augmenter.stats
        doc = {"status": "ok" if ok else "engine not ready", "engine": self.upstream, "engine_pid": self.engine_pid,
               "front": vars(self.stats).copy(),
               "coprocessor": {"placement": self.augmenter.placement, "num_latents": self.augmenter.num_latents,
                               "requests": a.requests, "computed": a.computed, "hits": a.hits,
                               "seconds": round(a.seconds, 3)}}
        return (200 if ok else 503), doc

    def close(self) -> None:
        """Stop the coprocessor worker (requests in flight finish)."""
        self.worker.shutdown(wait=False, cancel_futures=True)


def _handler(front: AugmentFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cacheaug-serve"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            if os.environ.get("CACHEAUG_SERVE_LOG"):
                super().log_message(format, *args)

        def _reply(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise ValueError(f"request body of {n} bytes is larger than {MAX_BODY}")
            return self.rfile.read(n) if n else b""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                status, doc = front.health()
                self._reply(status, doc)
            else:
                self._forward(self._body(), None)

        def do_POST(self) -> None:  # noqa: N802
            raw = self._body()
            info = None
            if self.path.split("?")[0] == "/v1/completions":
                try:
                    body = json.loads(raw or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("expected a JSON object")
                    if "augment" in body:
                        body, info = front.rewrite(body)
                        raw = json.dumps(body).encode()
                except (ValueError, UnicodeDecodeError) as e:
                    self._reply(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
                    return
            self._forward(raw, info)

        def do_DELETE(self) -> None:  # noqa: N802
            self._forward(self._body(), None)

        def _forward(self, raw: bytes, info: dict[str, Any] | None) -> None:
            conn = HTTPConnection(front.host, front.port, timeout=600)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers["Content-Length"] = str(len(raw))
                conn.request(self.command, self.path, body=raw if raw or self.command == "POST" else None,
                             headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                self._reply(502, {"error": {"message": f"engine unreachable: {e}", "type": "BadGateway",
                                            "code": 502}})
                conn.close()
                return
            try:
                ctype = resp.getheader("Content-Type", "")
                extra = {} if info is None else {"X-Cacheaug-Augmented": str(info["augmented"]).lower()}
                if "text/event-stream" not in ctype:
                    data = resp.read()
                    if info is not None and ctype.startswith("application/json"):
                        try:
                            doc = json.loads(data)
                            if isinstance(doc, dict):
                                doc["cacheaug"] = info
                                data = json.dumps(doc).encode()
                        except ValueError:
                            pass
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_HEADERS:
                            self.send_header(k, v)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(resp.status)  # a stream: relayed chunk by chunk as it comes
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := resp.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            finally:
                conn.close()

    return Handler


def make_front_server(front: AugmentFront, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The front's HTTP server bound to ``host:port`` (0: a free port); serve it with ``serve_forever``."""
    server = ThreadingHTTPServer((host, port), _handler(front))
    server.daemon_threads = True
    return server


def start_vllm(model_dir: str | os.PathLike, port: int, vllm_args: Sequence[str] = (), *,
               log: Any = None, kv_cache_gib: int = 2) -> subprocess.Popen:
    """vLLM's OpenAI server on 127.0.0.1:``port`` with prompt embeddings enabled, in its own process group
    (``kv_cache_gib``: the CPU backend's KV cache, unless VLLM_CPU_KVCACHE_SPACE is set)."""
    import importlib.util

    from cacheaug_engine.integrations.vllm import INSTALL_HINT

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"cacheaug serve needs vLLM: {INSTALL_HINT}")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-embeds", *vllm_args]
    env = dict(os.environ)
    # vLLM's CPU backend otherwise reserves --gpu-memory-utilization (92 %) of the machine's memory for
    # its KV cache and refuses to start on a shared machine; a set VLLM_CPU_KVCACHE_SPACE wins.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            start_new_session=True, env=env)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Wait until ``url`` answers 200; RuntimeError when ``proc`` exits first or the time runs out."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> bool:
    """Stop ``proc`` and its process group (the engine's workers): SIGTERM, up to ``grace_s`` for all of
    them to exit, then SIGKILL what is left. Returns True when the whole group is gone."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    t_end = time.monotonic() + grace_s
    while time.monotonic() < t_end and (proc.poll() is None or group_alive(pgid)):
        time.sleep(0.2)
    if proc.poll() is None or group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    t_end = time.monotonic() + 10
    while group_alive(pgid) and time.monotonic() < t_end:
        time.sleep(0.1)
    return not group_alive(pgid)


def serve(model_dir: str | os.PathLike, coprocessor: str | os.PathLike, *, host: str = "127.0.0.1",
          port: int = 8000, deadline_s: float = 10.0, vllm_args: Sequence[str] = (), ready_timeout_s: float = 600.0,
          log_file: str | os.PathLike | None = None, kv_cache_gib: int = 2) -> int:
    """Run the engine and the front until SIGINT / SIGTERM; returns the exit code (0 on a clean stop)."""
    from cacheaug_engine.integrations.vllm import load_augmenter

    model_dir = Path(model_dir)
    augmenter = load_augmenter(model_dir, coprocessor)  # bad paths fail here, before the engine starts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    inner = free_port()
    log = open(log_file, "ab") if log_file else None  # noqa: SIM115 - closed below
    proc = start_vllm(model_dir, inner, vllm_args, log=log, kv_cache_gib=kv_cache_gib)
    front = AugmentFront(augmenter, lambda t: list(tok.encode(t)), f"http://127.0.0.1:{inner}", deadline_s)
    front.engine_pid = proc.pid
    server = None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if server is not None:
            threading.Thread(target=server.shutdown, daemon=True).start()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = make_front_server(front, host, port)
        print(f"cacheaug serve: engine starting (vLLM on 127.0.0.1:{inner}) ...", flush=True)
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                wait_ready(f"{front.upstream}/health", proc, min(5.0, ready_timeout_s))
                break
            except RuntimeError:
                if proc.poll() is not None or time.monotonic() - t0 > ready_timeout_s:
                    raise
        if stop.is_set():
            return 0
        print(f"cacheaug serve: ready on http://{host}:{server.server_address[1]} "
              f"(engine {time.monotonic() - t0:.1f} s)", flush=True)
        server.serve_forever(poll_interval=0.2)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if server is not None:
            server.server_close()
        front.close()
        if not stop_process(proc):
            print(f"cacheaug serve: warning: engine process group {proc.pid} did not exit", flush=True)
        if log is not None:
            log.close()
        print("cacheaug serve: stopped", flush=True)


__all__ = ["AugmentFront", "FrontStats", "encode_embeds", "make_front_server", "serve", "start_vllm",
           "stop_process", "group_alive", "wait_ready", "free_port"]
