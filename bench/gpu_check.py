"""One prepared GPU check: install, CUDA tests, compute-sanitizer, benchmarks, a training run.

    bash bench/gpu_check.sh OUTDIR [--budget-s 420] [--steps install,pytest,...] [--rehearse]

Steps, in order, each time-boxed (``timeout``) and each writing its log into OUTDIR as it
goes; OUTDIR/gpu_check.json is rewritten after every step, so a call cut short still
returns what finished:

  install    pip install --no-deps --no-build-isolation -e . (builds csrc/ for this GPU),
             after installing from .whl/ any needed package the machine lacks
  pytest     pytest -m cuda -x with a junit report (pass/fail per test in the JSON)
  sanitizer  compute-sanitizer memcheck and racecheck over a few CUDA decode tests and
             Triton segment-attention CUDA tests
  bench      cacheaug bench all --budget-s <what is left> (targets: bench/targets.py)
  train      cacheaug bench recipe: bf16 training steps at the default recipe's shapes vs
             the naive per-position loop and the flex backend
  ncu        an Nsight Compute profile of the kernel of the first target not met (if time remains)

At most 8 files land in OUTDIR (the JSON, one log per step, the junit XML), none in
sub-folders. ``--rehearse`` runs the same script on a CPU: the GPU steps are replaced by
their CPU equivalents (the interpreter tests of the same kernels, the sanitizer test
selection collected but not run, the benchmarks at smoke size) and packages the GPU
image lacks are hidden, so the only surprise on the GPU is the GPU. Standard library
only until the install step has run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # as cacheaug_engine.bench.gpu_check (tests) or as a script before the install
    from . import gpu_steps
except ImportError:
    import gpu_steps  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("install", "pytest", "sanitizer", "bench", "train", "ncu")
SCHEMA = "cacheaug-gpu-check/1"
DEFAULT_BUDGET_S = {"gpu": 420.0, "rehearsal": 300.0}
MAX_FILES = 8


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Check:
    """The run's state: output folder, clock, environment for child processes, the JSON document."""

    def __init__(self, out: Path, budget_s: float, rehearse: bool, steps: tuple[str, ...], wheels: Path,
                 python: str, pytest_maxfail: int, pytest_workers: int | None) -> None:
        self.out = out
        self.budget_s = budget_s
        self.rehearse = rehearse
        self.steps = steps
        self.wheels = wheels
        self.python = python
        self.pytest_maxfail = pytest_maxfail
        self.pytest_workers = pytest_workers
        self.t0 = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="cacheaug_gpu_check_"))
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if not rehearse:
            self.env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
        else:
            self.env["TRITON_INTERPRET"] = "1"
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "mode": "rehearsal" if rehearse else "gpu", "started": now_iso(),
            "budget_s": budget_s, "steps_requested": list(steps), "steps": {}, "files": [],
        }

    # -- clock -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    # -- output ------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        path = self.out / name
        if name not in self.doc["files"]:
            if len(self.doc["files"]) + 1 >= MAX_FILES:  # gpu_check.json is the last slot
                raise RuntimeError(f"gpu_check would write more than {MAX_FILES} files into {self.out}")
            self.doc["files"].append(name)
        return path

    def save(self) -> None:
        self.doc["updated"] = now_iso()
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    def say(self, msg: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s] {msg}", flush=True)

    # -- running -----------------------------------------------------------------------
    def run(self, cmd: list[str], log: str, timeout_s: float, env: dict[str, str] | None = None,
            append: bool = False) -> dict[str, Any]:
        """Run ``cmd`` with its output into OUTDIR/``log``; SIGINT at the timeout, SIGKILL 20 s later.

        SIGINT first: pytest then still writes its junit report and summary.
        """
        path = self.log_path(log)
        timeout_s = max(1.0, float(timeout_s))
        full = ["timeout", "-s", "INT", "-k", "20", f"{timeout_s:.0f}", *cmd]
        t = time.monotonic()
        with path.open("a" if append else "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n# timeout {timeout_s:.0f} s, started {now_iso()}\n")
            fh.flush()
            try:
                rc = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT, env=env or self.env, cwd=ROOT,
                                    check=False).returncode
            except FileNotFoundError as exc:
                fh.write(f"# could not start: {exc}\n")
                rc = 127
            fh.write(f"\n# exit {rc} after {time.monotonic() - t:.1f} s\n")
        seconds = round(time.monotonic() - t, 1)
        timed_out = rc in (124, 137) or (rc == 130 and seconds >= timeout_s - 1)
        return {"cmd": " ".join(cmd), "rc": rc, "seconds": seconds, "timed_out": timed_out, "log": log}

    def step(self, name: str, fn) -> None:
        if name not in self.steps:
            self.doc["steps"][name] = {"status": "skipped", "reason": "not requested (--steps)"}
            self.save()
            return
        self.say(f"{name}: start ({self.remaining():.0f} s of the budget left)")
        t = time.monotonic()
        self.doc["steps"][name] = {"status": "running"}
        self.save()
        try:
            result = fn(self)
        except Exception as exc:  # noqa: BLE001 - the check goes on; the failure is recorded
            result = {"status": "failed", "reason": f"gpu_check error: {type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - t, 1)  # the whole step (a command's own time: its log)
        self.doc["steps"][name] = result
        self.save()
        self.say(f"{name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else "")
                 + f" in {result['seconds']} s")


def capture(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str | None:
    """stdout of a short command, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment(chk: Check) -> dict[str, Any]:
    """Device, driver, CUDA, torch, triton, tool versions and the commit (None where absent, never guessed)."""
    env: dict[str, Any] = {"python": platform.python_version(), "python_exe": chk.python,
                           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    smi = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                   "--format=csv,noheader"])
    if smi:
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        env.update(gpu=parts[0], driver=parts[1], gpu_memory=parts[2], compute_cap=parts[3] if len(parts) > 3 else None)
    else:
        env.update(gpu=None, driver=None, gpu_memory=None, compute_cap=None)
    probe = ("import json, torch\ntry:\n import triton; tv = triton.__version__\nexcept Exception: tv = None\n"
             "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'triton': tv,"
             " 'cuda_available': torch.cuda.is_available(),"
             " 'torch_device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    out = capture([chk.python, "-c", probe], env=chk.env)
    env.update(json.loads(out) if out else {"torch": None})
    nvcc = capture(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    for tool in ("compute-sanitizer", "ncu"):
        ver = capture([tool, "--version"])
        env[tool.replace("-", "_")] = ver.splitlines()[-1] if ver else None
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["cpu"] = cpu
    given = os.environ.get("CACHEAUG_GIT_COMMIT")
    commit = given or capture(["git", "rev-parse", "HEAD"])
    if commit and not given and capture(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    env["commit"] = commit
    env["commit_source"] = ("CACHEAUG_GIT_COMMIT" if given
                            else "git" if commit else "unknown: no .git here and CACHEAUG_GIT_COMMIT unset")
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="folder for gpu_check.json and the logs (created; files are overwritten)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds for all steps (default 420 on a GPU, 300 with --rehearse)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--rehearse", action="store_true", default=os.environ.get("GPU_CHECK_REHEARSE") == "1",
                   help="CPU rehearsal (also GPU_CHECK_REHEARSE=1)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (default .whl/)")
    p.add_argument("--maxfail", type=int, default=1, help="pytest stops after this many failures (1 = -x)")
    p.add_argument("--workers", type=int, default=None,
                   help="pytest-xdist workers for the CUDA suite (default 4 on a GPU when xdist imports; 0 = off)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> tuple[float, tuple[str, ...]]:
    """(budget, steps) or ValueError naming the bad argument (before anything runs)."""
    mode = "rehearsal" if args.rehearse else "gpu"
    budget = DEFAULT_BUDGET_S[mode] if args.budget_s is None else args.budget_s
    if not budget >= 30:
        raise ValueError(f"--budget-s must be at least 30 seconds, got {args.budget_s!r}")
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise ValueError(f"--steps: unknown step(s) {bad or args.steps!r}; choose from {','.join(STEPS)}")
    if args.maxfail < 1:
        raise ValueError(f"--maxfail must be >= 1, got {args.maxfail}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    return budget, steps


def extract(check_json: Path, dest: Path) -> list[Path]:
    """Write the bench and train result documents held in a gpu_check.json as bench/results files.

    Names: <device>-<date>.json (bench all) and <device>-<date>-recipe.json (the training
    run), ready for ``cacheaug bench plot``. Returns the paths written.
    """
    doc = json.loads(Path(check_json).read_text())
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for step, suffix in (("bench", ""), ("train", "-recipe")):
        res = (doc.get("steps", {}).get(step) or {}).get("results")
        if not res:
            continue
        device = re.sub(r"[^a-z0-9]+", "-", str(res.get("device", "device")).lower()).strip("-")
        path = dest / f"{device}-{str(res.get('date', ''))[:10]}{suffix}.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["extract"]:
        if len(argv) != 3:
            print("usage: python bench/gpu_check.py extract GPU_CHECK_JSON DEST_DIR", file=sys.stderr)
            return 2
        for path in extract(Path(argv[1]), Path(argv[2])):
            print(path)
        return 0
    args = parse_args(argv)
    try:
        budget, steps = validate(args)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    chk = Check(out, budget, args.rehearse, steps, Path(args.wheels), sys.executable, args.maxfail, args.workers)
    chk.say(f"{chk.doc['mode']}: budget {budget:.0f} s, steps {','.join(steps)}, out {out}")
    chk.doc["env"] = environment(chk)
    chk.save()
    if not args.rehearse and not chk.doc["env"].get("cuda_available"):
        chk.say("warning: torch sees no CUDA device; the GPU steps will fail (use --rehearse on a CPU)")
    for name in STEPS:
        chk.step(name, getattr(gpu_steps, f"step_{name}"))
    chk.doc["targets"] = gpu_steps.judge_targets(chk)
    chk.doc["finished"] = now_iso()
    chk.save()
    for line in gpu_steps.summary_lines(chk.doc):
        print(line, flush=True)
    failed = [n for n, s in chk.doc["steps"].items() if s.get("status") in ("failed", "timeout")]
    shutil.rmtree(chk.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
