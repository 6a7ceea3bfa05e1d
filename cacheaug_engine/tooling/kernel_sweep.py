"""Ahead-of-time compile sweep over the Triton kernel registry, in clean worker processes.

`plan(...)` lists one task per (kernel, specialisation, config, target); `run(tasks)` feeds
them to N worker processes (`python -m cacheaug_engine.tooling.kernel_sweep --worker`), each started
with TRITON_INTERPRET removed from its environment (the test suite sets it, and a kernel
imported under the interpreter cannot be compiled) and Triton's on-disk cache shared, so a
rerun only recompiles what changed. A crashing worker turns its task into an error record
and is replaced. Records are `triton_kernels.compile_check.compile_launch` records plus kernel, target,
spec, config and default.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

REGISTRY = "cacheaug_engine.triton_kernels.kernel_specs:KERNELS"


def load_registry(ref: str = REGISTRY) -> tuple:
    """The KernelSpec tuple named by "module:ATTR"."""
    module, _, attr = ref.partition(":")
    return tuple(getattr(importlib.import_module(module), attr or "KERNELS"))


def plan(kernels: Sequence, targets: Iterable[int], *, sweep: str = "ci", all_configs: bool = False,
         only: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Tasks: every specialisation of the sweep x (default config, or all configs) x target."""
    tasks = []
    for k in kernels:
        if only and not any(o in k.name for o in only):
            continue
        for spec in k.specialisations(sweep):
            for cfg in k.configs(spec):
                if not (cfg.default or all_configs):
                    continue
                for arch in targets:
                    tasks.append(dict(kernel=k.name, spec=spec, meta=cfg.meta, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages, default=cfg.default, arch=int(arch),
                                      config=cfg.label()))
    return tasks


def compile_task(kernels: Sequence, task: dict[str, Any]) -> dict[str, Any]:
    """Compile one task in this process (needs TRITON_INTERPRET unset) and return its record."""
    from cacheaug_engine.triton_kernels.compile_check import compile_launch
    from cacheaug_engine.triton_kernels.kernel_specs import LaunchConfig, by_name, launch_values

    head = {key: task[key] for key in ("kernel", "spec", "config", "meta", "default")}
    head["target"] = f"sm_{task['arch']}"
    try:
        kernel = by_name(task["kernel"], kernels)
        cfg = LaunchConfig(task["meta"], task["num_warps"], task["num_stages"], task["default"])
        values = launch_values(kernel, task["spec"], cfg)
        fn = kernel.fn()
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot even be set up is an error record
        return {**head, "status": "error", "error": f"setup: {type(exc).__name__}: {exc}"}
    rec = compile_launch(fn, values, arch=task["arch"], num_warps=task["num_warps"], num_stages=task["num_stages"])
    return {**head, **rec}


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated so it does not warn
    return env


def _worker_main() -> None:
    """Read tasks (JSON lines) on stdin, write records (JSON lines) on the original stdout."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the compiler prints goes to stderr, never into the protocol
    cache: dict[str, tuple] = {}
    for line in sys.stdin:
        task = json.loads(line)
        ref = task.get("registry", REGISTRY)
        if ref not in cache:
            cache[ref] = load_registry(ref)
        proto.write(json.dumps(compile_task(cache[ref], task)) + "\n")
        proto.flush()


def run(tasks: list[dict[str, Any]], *, workers: int = 2, registry: str = REGISTRY, extra_paths: Sequence[str] = (),
        progress=None) -> list[dict[str, Any]]:
    """Compile every task in `workers` clean subprocesses; records come back in task order."""
    env = worker_env()
    if extra_paths:
        env["PYTHONPATH"] = os.pathsep.join([*extra_paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    order = iter(range(len(tasks)))
    lock = threading.Lock()

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cacheaug_engine.tooling.kernel_sweep", "--worker"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def drive() -> None:
        proc = start()
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                break
            task = {**tasks[i], "registry": registry}
            try:
                proc.stdin.write(json.dumps(task) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except BrokenPipeError:
                line = ""
            if line:
                results[i] = json.loads(line)
            else:  # the worker died on this task (e.g. a compiler crash): record it, start a new worker
                proc.wait()
                results[i] = {"kernel": task["kernel"], "spec": task["spec"], "config": task["config"],
                              "meta": task["meta"], "default": task["default"], "target": f"sm_{task['arch']}",
                              "status": "error", "error": f"compile worker exited with code {proc.returncode}"}
                proc = start()
            if progress is not None:
                progress(results[i])
        proc.stdin.close()
        proc.wait()

    threads = [threading.Thread(target=drive) for _ in range(max(1, min(workers, len(tasks))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def failures(records: Iterable[dict[str, Any]], *, triton_spills: bool = True) -> list[str]:
    """Default configs that do not compile, or that spill (CUDA C++ always; Triton when `triton_spills`)."""
    out = []
    for r in records:
        if not r.get("default", True):
            continue
        where = f"{r['kernel']} {r['target']} {spec_label(r.get('spec', {}))} [{r.get('config', '')}]"
        if r["status"] != "ok":
            out.append(f"{where}: {r['error']}")
        elif r.get("spills") and (triton_spills or r.get("family") == "cuda"):
            out.append(f"{where}: spills {r['spills']} B ({r['spill_stores']} B stores, {r['spill_loads']} B loads)")
    return out


def spec_label(spec: dict[str, Any]) -> str:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    parts = []
    for key, val in spec.items():
        if isinstance(val, bool):
            if val:
                parts.append(key)
        elif key == "dtype":
            parts.append(short.get(val, val))
        elif key == "head_dim":
            parts.append(f"d{val}")
        elif key == "group":
            parts.append(f"G{val}")
        else:
            parts.append(str(val))
    return " ".join(parts)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m cacheaug_engine.tooling.kernel_sweep --worker (use `cacheaug kernels` instead)")
