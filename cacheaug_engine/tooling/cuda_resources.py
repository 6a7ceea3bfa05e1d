"""ptxas resource usage of the CUDA C++ kernels (csrc/*.cu): registers, spills, shared memory.

`start(archs)` launches `nvcc -c -Xptxas -v` on the sources for each architecture in the
background (so it overlaps the Triton sweep); `collect(job)` parses the report into records
shaped like `kernel_compile` records (kernel, target, registers, spills, shared_bytes, ...).
The flags follow CMakeLists.txt (--use_fast_math, --expt-relaxed-constexpr, -O3).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().parents[2] / "csrc"  # the repository's csrc/, beside the package

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


@dataclass
class Job:
    proc: subprocess.Popen | None
    tmp: tempfile.TemporaryDirectory | None
    skipped: str | None = None


def parse_ptxas_v(log: str) -> list[dict[str, Any]]:
    """One record per (entry function, sm) in an `nvcc -Xptxas -v` log."""
    records: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(kernel=m.group(1), target=m.group(2).rstrip("a"), spec={}, config="", meta={}, default=True,
                       status="ok", error=None, registers=None, spill_stores=0, spill_loads=0, spills=0,
                       stack_bytes=0, shared_bytes=0, family="cuda")
            records.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)),
                       spills=int(m.group(2)) + int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), shared_bytes=int(m.group(2) or 0))
    return records


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    return dict(zip(names, out.splitlines(), strict=False))


def start(archs: list[int], sources: list[Path] | None = None) -> Job:
    """Start nvcc on the CUDA sources in the background, or a skipped job saying why."""
    nvcc = shutil.which("nvcc")
    sources = sorted(CSRC.glob("*.cu")) if sources is None else sources
    if nvcc is None:
        return Job(None, None, "nvcc not found on PATH")
    if not sources:
        return Job(None, None, f"no CUDA sources under {CSRC}")
    tmp = tempfile.TemporaryDirectory(prefix="cacheaug-ptxas-")
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-Xptxas", "-v",
           f"-I{sources[0].parent}"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # one nvcc per source keeps the object names apart; sources are few
    script = " && ".join(" ".join([*cmd, str(s), "-o", str(Path(tmp.name) / (s.stem + ".o"))]) for s in sources)
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Job(proc, tmp)


def collect(job: Job) -> tuple[list[dict[str, Any]], str | None]:
    """(records, note): the parsed report, or an error record when nvcc failed."""
    if job.proc is None:
        return [], job.skipped
    log, _ = job.proc.communicate()
    job.tmp.cleanup()
    if job.proc.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-8:])
        return [dict(kernel="csrc (nvcc)", target="all", spec={}, config="", meta={}, default=True, family="cuda",
                     status="error", error=f"nvcc exited with {job.proc.returncode}: {tail}")], None
    records = parse_ptxas_v(log)
    names = _demangle([r["kernel"] for r in records])
    for r in records:
        r["mangled"] = r["kernel"]
        r["kernel"] = names.get(r["kernel"], r["kernel"])
    return records, None
