"""`cacheaug kernels`: list the Triton kernels and their configs, or compile them all for GPUs.

    cacheaug kernels                                  # kernels, specialisations, configs
    cacheaug kernels --compile [--targets 80,90] [--out FILE.json] [--markdown FILE.md]
                     [--all-configs] [--full] [--kernel NAME] [--workers N] [--no-cuda]
    cacheaug kernels --from-json FILE.json --markdown FILE.md   # re-render a run's table

--compile needs no GPU. Default sweep ("ci"): the default config (autotuning off) of every
specialisation in the registry's CI list, which covers every dtype, head dim, flag and GQA
group value; --all-configs adds every autotune candidate; --full takes the whole product
of the specialisation axes. The CUDA C++ kernels (csrc/) are reported from `nvcc -Xptxas -v`
alongside. Exit code 1 when a default config fails to compile or a CUDA C++ kernel spills; with
--strict also when a Triton default config spills (these are printed as SPILL lines either way).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cacheaug_engine.tooling import cuda_resources, kernel_sweep
from cacheaug_engine.tooling.kernel_sweep import spec_label


def add_parser(sub: Any) -> None:
    """Register ``kernels`` on the subcommand parsers ``sub``."""
    k = sub.add_parser("kernels", help="list Triton kernels; --compile: build them for sm_80/sm_90, no GPU needed",
                       description="List or ahead-of-time compile the Triton kernels (see cli/kernels.py).")
    add_arguments(k)
    k.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help="compile every kernel for --targets (no GPU needed)")
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--out", metavar="JSON", default="kernel_compile.json", help="records file (--compile)")
    p.add_argument("--markdown", metavar="MD", help="also write the default configs' table as Markdown")
    p.add_argument("--from-json", metavar="JSON", help="with --markdown: render a previous --compile JSON, no compile")
    p.add_argument("--all-configs", action="store_true", help="every autotune candidate, not only the defaults")
    p.add_argument("--full", action="store_true", help="the full product of specialisation axes (hours)")
    p.add_argument("--kernel", action="append", default=[], metavar="NAME", help="only kernels whose name has NAME")
    p.add_argument("--workers", type=int, default=2, help="parallel compile processes (default 2)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ ptxas report")
    p.add_argument("--strict", action="store_true",
                   help="also fail on a Triton default config that spills (always: compile errors, CUDA spills)")


def _targets(text: str) -> list[int]:
    try:
        archs = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        archs = []
    if not archs or any(a < 70 for a in archs):
        raise ValueError(f"--targets: expected compute capabilities like 80,90, got {text!r}")
    return archs


def run(args: argparse.Namespace) -> int:
    archs = _targets(args.targets)
    if args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    if args.from_json:
        if not args.markdown:
            raise ValueError("--from-json: give --markdown FILE to render it to")
        doc = json.loads(Path(args.from_json).read_text())
        doc["json"] = args.from_json
        Path(args.markdown).write_text(markdown(doc))
        print(f"wrote Markdown table to {args.markdown}")
        return 0
    if args.compile:  # found now, not after minutes of compiling
        from cacheaug_engine.checks import check_output_file

        check_output_file(args.out, "--out")
        if args.markdown:
            check_output_file(args.markdown, "--markdown")
    kernels = kernel_sweep.load_registry()
    sweep = "full" if args.full else "ci"
    if not args.compile:
        print(listing(kernels, sweep))
        return 0
    tasks = kernel_sweep.plan(kernels, archs, sweep=sweep, all_configs=args.all_configs, only=args.kernel)
    if not tasks:
        raise ValueError(f"--kernel: no kernel matches {args.kernel}")
    job = cuda_resources.start(archs) if not args.no_cuda else None
    t0 = time.perf_counter()
    print(f"compiling {len(tasks)} Triton launches for sm_{', sm_'.join(map(str, archs))} "
          f"with {args.workers} workers ...", flush=True)
    records = kernel_sweep.run(tasks, workers=args.workers)
    for r in records:
        r["family"] = "triton"
    note = None
    if job is not None:
        cuda, note = cuda_resources.collect(job)
        records += cuda
    elapsed = time.perf_counter() - t0
    doc = dict(sweep=sweep, all_configs=args.all_configs, targets=[f"sm_{a}" for a in archs],
               elapsed_s=round(elapsed, 1), workers=args.workers, host=platform.node(), versions=_versions(),
               cuda_note=note, json=str(args.out), records=records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(summary(records))
    if note:
        print(f"CUDA C++: {note}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(doc))
        print(f"wrote Markdown table to {args.markdown}")
    bad = kernel_sweep.failures(records, triton_spills=args.strict)
    spilling = [line for line in kernel_sweep.failures(records) if line not in bad]
    n_err = sum(r["status"] != "ok" for r in records)
    print(f"{len(records)} records, {n_err} errors, {len(bad)} failing, {len(spilling)} Triton default spills "
          f"(fail with --strict) in {elapsed:.0f} s; "
          f"JSON written to {out.resolve()}")
    for line in spilling:
        print(f"SPILL {line}")
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


def _versions() -> dict[str, str]:
    import torch
    import triton

    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version())


def listing(kernels, sweep: str) -> str:
    lines = []
    for k in kernels:
        specs = k.specialisations(sweep)
        cfgs = k.configs(specs[0])
        lines.append(f"{k.name}  ({k.module.rsplit('.', 1)[-1]}.{k.attr}): {k.doc}")
        lines.append(f"  {len(specs)} specialisations in the {sweep} sweep "
                     f"({len(k.specialisations('full'))} in --full); configs: "
                     + ", ".join(c.label() + (" (default)" if c.default else "") for c in cfgs))
        defaults = sorted({c.label() for s in specs for c in k.configs(s) if c.default})
        if len(defaults) > 1:
            lines.append(f"  defaults over its specialisations: {', '.join(defaults)}")
    return "\n".join(lines)


def _fmt(r: dict[str, Any]) -> tuple[str, ...]:
    if r["status"] != "ok":
        return ("error", "-", "-", "-", "-", (r.get("error") or "")[:60])
    hg = {True: "yes", False: "no", None: "-"}[r.get("hgmma")]
    return ("ok", str(r["registers"]), str(r["spills"]), f"{r['shared_bytes'] / 1024:.1f}", hg, "")


def _groups(records):
    """Default records grouped by (kernel, target, config): worst registers / spills / smem over specialisations."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        if r.get("default", True):
            groups[(r["kernel"], r["target"], r.get("config", ""))].append(r)
    return groups


def summary_rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Per (kernel, target, default config): compiled/total, max registers, max spills, max smem, HGMMA."""
    rows = []
    for (kernel, target, cfg), rs in sorted(_groups(records).items()):
        ok = [r for r in rs if r["status"] == "ok"]
        hg = {r.get("hgmma") for r in ok}
        rows.append((kernel, target, cfg or "-", f"{len(ok)}/{len(rs)}",
                     str(max((r["registers"] for r in ok), default="-")),
                     str(max((r["spills"] for r in ok), default="-")),
                     f"{max((r['shared_bytes'] for r in ok), default=0) / 1024:.1f}",
                     "-" if hg <= {None} else "yes" if hg == {True} else "no" if hg == {False} else "mixed"))
    return rows


def summary(records: list[dict[str, Any]]) -> str:
    """The summary table printed on stdout."""
    rows = [("kernel", "target", "config", "ok", "max regs", "max spills B", "max smem KB", "HGMMA")]
    rows += [(r[0][:60], *r[1:]) for r in summary_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    allc = [r for r in records if not r.get("default", True)]
    if allc:
        n_ok = sum(not cfg_rejected(r) for r in allc)
        text += f"\nautotune candidates: {n_ok}/{len(allc)} compile without spills within shared memory"
    return text


def markdown(doc: dict[str, Any]) -> str:
    """Markdown for the kernels' documentation from a `--compile` JSON document: summary, then every default record."""
    recs = doc["records"]
    out = [f"<!-- generated by `cacheaug kernels --compile --markdown` from {doc.get('json', 'the JSON')}; "
           "do not edit by hand -->",
           "# Triton and CUDA C++ kernels compiled for A100 (sm_80) and H100 (sm_90)", "",
           f"Compiled without a GPU by `cacheaug kernels --compile` (triton {doc['versions']['triton']}, "
           f"{doc['sweep']} sweep, targets {', '.join(doc['targets'])}, {len(recs)} records"
           + (f", {doc['elapsed_s']} s with {doc.get('workers')} workers" if "elapsed_s" in doc else "") + ").",
           "Registers and spills from ptxas `-v`; smem = shared memory per block (Triton: dynamic, the launch's "
           "`metadata.shared`; CUDA C++: static `__shared__`); HGMMA = the sm_90 SASS uses warpgroup MMA.", "",
           "## Default configs (autotuning off): worst case over the specialisations", "",
           "| kernel | target | config | compiled | max regs | max spills B | max smem KB | HGMMA |",
           "|---|---|---|---|---|---|---|---|"]
    for row in summary_rows(recs):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    allc = [r for r in recs if not r.get("default", True)]
    if allc:
        bad = sum(cfg_rejected(r) for r in allc)
        out += ["", f"Autotune candidates compiled: {len(allc)}; rejected by the compile rule "
                f"(error, spill or shared memory over the limit): {bad}."]
    out += ["", "## Every default-config record", "",
            "| kernel | target | specialisation | config | status | regs | spills B | smem KB | HGMMA | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in recs if r.get("default", True)),
                    key=lambda r: (r.get("family", ""), r["kernel"], r["target"], spec_label(r.get("spec", {})))):
        cells = (r["kernel"].replace("|", "\\|"), r["target"], spec_label(r.get("spec", {})) or "-",
                 r.get("config") or "-", *_fmt(r))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def cfg_rejected(r: dict[str, Any]) -> bool:
    return r["status"] != "ok" or bool(r.get("spills"))


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="cacheaug kernels")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
