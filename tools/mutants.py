# ruff: noqa: E501  (mutant texts are copied verbatim from the source lines they change)
"""Targeted mutation run over the modules that carry the project's claims (issue 28).

Each mutant is one small, plausible bug - a control scored without its scale, a file not fsynced,
targets shifted one row - planted as a text edit in a COPY of the package; the test files that
should notice it run there (``pytest -x``); the mutant is *caught* when they fail and *survives*
when they pass. The working tree is never modified.

Run on demand and before a release (not in every CI run: it takes minutes)::

    python tools/mutants.py                      # all mutants, a table on stdout
    python tools/mutants.py --only ctl-pause-no-scale,ck-no-file-fsync
    python tools/mutants.py --tests-ref <commit>  # the same mutants against an older commit's tests
    python tools/mutants.py --markdown out.md     # also write the table as markdown

Survivors are listed in docs/mutation.md with the decision for each (killed by a new test, or
equivalent and why). A mutant whose text no longer occurs exactly once in its file is an error
(the list is maintained with the code). Exit status: 0 when nothing survives, 1 otherwise, 2 on
an error (stale mutant, a selection that fails unmutated).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "cacheaug_engine"

# test selections (files; an optional -k expression after "::k=")
CONTROLS = ("tests/eval/test_control_oracles.py", "tests/eval/test_controls.py")
OBJECTIVE = ("tests/augment/test_objective_oracles.py", "tests/augment/test_augment.py")
SCALE = ("tests/augment/test_objective_oracles.py", "tests/eval/test_controls.py", "tests/eval/test_control_oracles.py")
CHECKPOINT = (
    "tests/train/test_checkpoint_durability.py",
    "tests/train/test_checkpoint.py::k=not full_disk and not nonfinite and not huge_lr",
)
DIST = ("tests/train/test_checkpoint_durability.py", "tests/train/test_distributed.py::k=incomplete")
PLAN = ("tests/ops/test_plan.py", "tests/ops/test_ops_dispatch.py")


@dataclass(frozen=True)
class Mutant:
    """``old`` (exactly once in ``file``) becomes ``new``; ``tests`` should notice."""

    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


M = Mutant
MUTANTS: list[Mutant] = [
    # ---- the controls (augment/controls.py, the pause path of augment/coprocessor.py)
    M("ctl-pause-no-scale", "augment/coprocessor.py",
      "z = self.soft_tokens.to(dtype) * self.scale().to(dtype).view(nl, 1)", "z = self.soft_tokens.to(dtype)",
      SCALE, "pause latents without their learned scale"),
    M("ctl-pause-scale-detached", "augment/coprocessor.py",
      "z = self.soft_tokens.to(dtype) * self.scale().to(dtype).view(nl, 1)",
      "z = self.soft_tokens.to(dtype) * self.scale().detach().to(dtype).view(nl, 1)",
      SCALE, "no gradient reaches the pause table's scale"),
    M("cop-no-scale", "augment/coprocessor.py",
      "z = hidden.view(b, n, nl, -1) * self.scale().to(hidden.dtype).view(1, 1, nl, 1)",
      "z = hidden.view(b, n, nl, -1)", SCALE, "coprocessor latents without their scale"),
    M("cop-scale-detached", "augment/coprocessor.py",
      "z = hidden.view(b, n, nl, -1) * self.scale().to(hidden.dtype).view(1, 1, nl, 1)",
      "z = hidden.view(b, n, nl, -1) * self.scale().detach().to(hidden.dtype).view(1, 1, nl, 1)",
      SCALE, "no gradient reaches the coprocessor's scale"),
    M("ctl-shuffle-identity", "augment/controls.py", "return latents.roll(shift, dims=0)", "return latents",
      CONTROLS, "shuffled_latents returns the row's own latents"),
    M("ctl-shuffle-points", "augment/controls.py", "return latents.roll(shift, dims=0)",
      "return latents.roll(shift, dims=1)", CONTROLS, "shuffles points within a row instead of rows"),
    M("ctl-constant-slots", "augment/controls.py", "return self.table.view(1, 1, *self.table.shape)",
      "return self.table.flip(0).view(1, 1, *self.table.shape)", CONTROLS, "mean control's slots swapped"),
    M("ctl-mean-count", "eval/evaluator.py", "count += z.shape[0] * z.shape[1]", "count += z.shape[0]",
      CONTROLS, "mean latent divided by sequences, not points"),
    M("ctl-mean-first-point", "eval/evaluator.py", "s = z.sum((0, 1)).double()",
      "s = z[:, :1].sum((0, 1)).double() * z.shape[1]", CONTROLS, "mean latent from the first point only"),
    M("ctl-stats-no-centre", "augment/controls.py", "dev_ms = max(ms - float(mean.pow(2).sum()) / numel, 0.0)",
      "dev_ms = ms", CONTROLS, "cache-dependence figure without subtracting the mean"),
    # ---- the evaluator and its tables (eval/evaluator.py, eval/tables.py)
    M("ev-shuffled-unshuffled", "eval/evaluator.py", "objective.score(ids, cache, lay, shuffled_latents(z))",
      "objective.score(ids, cache, lay, z)", CONTROLS, "the shuffled control scored on the unshuffled latents"),
    M("ev-control-cop-layout", "eval/evaluator.py",
      "lay_c = block_layout(pos, src.num_latents, na, src.placement)",
      "lay_c = block_layout(pos, src.num_latents, na, cop.placement)", CONTROLS,
      "controls scored with the coprocessor's placement"),
    M("ev-first-point-only", "eval/evaluator.py", "rows[name].append(ce.double().mean(1).cpu())",
      "rows[name].append(ce.double()[:, 0].cpu())", CONTROLS, "per-sequence CE from the first point only"),
    M("ev-points-shifted", "eval/evaluator.py", "start=min(stride, t - ahead)", "start=min(stride, t - ahead) + 1",
      CONTROLS, "evaluation points one token later"),
    M("ev-mean-from-heldout", "eval/evaluator.py", "cop, objective.decoder, train_sample, ahead=objective.ahead",
      "cop, objective.decoder, heldout, ahead=objective.ahead", CONTROLS,
      "mean control computed on the held-out text"),
    M("ev-pause-as-copro", "eval/evaluator.py", "ces[name] = objective.score(ids, cache, lay_c, src(cache, lay_c))",
      "ces[name] = objective.score(ids, cache, lay, z) if name == 'pause' else objective.score(ids, cache, lay_c, "
      "src(cache, lay_c))", CONTROLS, "the pause row filled with the coprocessor's CE"),
    M("tab-std-biased", "eval/tables.py", "d.std(unbiased=True)", "d.std(unbiased=False)", CONTROLS,
      "interval from the biased standard deviation"),
    M("tab-pct-linear", "eval/tables.py", "return 100.0 * math.expm1(x)", "return 100.0 * x", CONTROLS,
      "perplexity change as the CE change"),
    M("tab-paired-sign", "eval/tables.py", "d = (a.double() - b.double()).flatten()",
      "d = (b.double() - a.double()).flatten()", CONTROLS, "change against the reference with the sign flipped"),
    M("tab-mean-row-skips-first", "eval/tables.py", "[v[:, :k].mean(1)]", "[v[:, 1:k].mean(1)]", CONTROLS,
      "mean row without position 1"),
    # ---- the objective's alignment (augment/objective.py, augment/layout.py)
    M("obj-target-rows-shifted", "augment/objective.py", "h_t = hidden.view(b, n, s, -1)[:, :, s - na :]",
      "h_t = hidden.view(b, n, s, -1)[:, :, s - na - 1 : s - 1]", OBJECTIVE, "targets scored one row early"),
    M("obj-baseline-rows", "augment/objective.py", "tb = torch.gather(input_ids, 1, lay.target_idx.reshape(b, n * na))",
      "tb = torch.gather(input_ids, 1, lay.baseline_idx.reshape(b, n * na))", OBJECTIVE,
      "baseline CE against the previous token"),
    M("obj-loss-first-target", "augment/objective.py", "loss = ce.mean()", "loss = ce[..., 0].mean()", OBJECTIVE,
      "loss from position 1 only"),
    M("obj-contrast-sign", "augment/objective.py", "gap = ce.mean(-1) - ce_other.mean(-1)",
      "gap = ce_other.mean(-1) - ce.mean(-1)", OBJECTIVE, "contrast hinge with the sign flipped"),
    M("obj-contrast-no-margin", "augment/objective.py", "F.relu(gap + self.contrast_margin)", "F.relu(gap)",
      OBJECTIVE, "contrast margin ignored"),
    M("obj-contrast-in-eval", "augment/objective.py", "if self.contrast > 0 and self.training and",
      "if self.contrast > 0 and", OBJECTIVE, "contrast term also in eval mode"),
    M("obj-contrast-roll-points", "augment/objective.py", "latents.roll(1, dims=0)", "latents.roll(1, dims=1)",
      OBJECTIVE, "contrast against another point of the same row"),
    M("lay-early-as-paper", "augment/layout.py", 'shift = 1 if placement == "early" else 0', "shift = 0",
      OBJECTIVE, "early placement laid out as paper"),
    M("lay-dec-pos-off-by-one", "augment/layout.py", "dec_pos = (start.unsqueeze(-1) + torch.arange(block",
      "dec_pos = (start.unsqueeze(-1) + 1 + torch.arange(block", OBJECTIVE, "decoder rows' RoPE positions + 1"),
    M("lay-copro-pos-off-by-one", "augment/layout.py",
      "copro_pos = (start.unsqueeze(-1) + torch.arange(num_latents",
      "copro_pos = (start.unsqueeze(-1) + 1 + torch.arange(num_latents", OBJECTIVE,
      "coprocessor rows' RoPE positions + 1"),
    M("lay-prefix-plus-one", "augment/layout.py", "prefix_lens=start,", "prefix_lens=start + 1,", OBJECTIVE,
      "each block sees one cache entry too many (its first target)"),
    M("lay-increasing-allows-equal", "augment/layout.py", "(positions[:, 1:] > positions[:, :-1])",
      "(positions[:, 1:] >= positions[:, :-1])", OBJECTIVE, "repeated points accepted"),
    # ---- the checkpoint swap (train/checkpoint.py, train/dist_checkpoint.py)
    M("ck-no-file-fsync", "train/checkpoint.py", "save_file(_contig(coprocessor), str(target), metadata=meta)\n"
      "        fsync_file(target)", "save_file(_contig(coprocessor), str(target), metadata=meta)", CHECKPOINT,
      "coprocessor.safetensors not fsynced"),
    M("ck-no-optim-fsync", "train/checkpoint.py", "save_file(_contig(optimizer_tensors), str(target), metadata=meta)\n"
      "            fsync_file(target)", "save_file(_contig(optimizer_tensors), str(target), metadata=meta)",
      CHECKPOINT, "optimizer.safetensors not fsynced"),
    M("ck-no-state-fsync", "train/checkpoint.py", "write_text_synced(target, text)", "target.write_text(text)",
      CHECKPOINT, "state.json not fsynced"),
    M("io-fsync-file-noop", "fileio.py", "with open(path, \"rb\") as f:\n        os.fsync(f.fileno())",
      "with open(path, \"rb\") as f:\n        f.fileno()", CHECKPOINT, "fsync_file opens but does not fsync"),
    M("io-synced-text-no-fsync", "fileio.py", "f.write(text)\n        f.flush()\n        os.fsync(f.fileno())",
      "f.write(text)\n        f.flush()", CHECKPOINT, "write_text_synced does not fsync"),
    M("ck-no-tmp-dir-fsync", "train/checkpoint.py", "    fsync_dir(tmp, missing_ok=True)\n", "", CHECKPOINT,
      "temp directory entries not fsynced before the swap"),
    M("ck-no-parent-fsync", "train/checkpoint.py", "    os.replace(tmp, path)\n    fsync_dir(path.parent, missing_ok=True)\n",
      "    os.replace(tmp, path)\n", CHECKPOINT, "parent not fsynced after the swap"),
    M("ck-old-deleted-early", "train/checkpoint.py", "    if path.exists():\n        os.replace(path, old)\n",
      "    if path.exists():\n        os.replace(path, old)\n        shutil.rmtree(old)\n", CHECKPOINT,
      ".old deleted before the new checkpoint is in place"),
    M("ck-old-always-removed", "train/checkpoint.py", "        if (path / complete).is_file():\n            shutil.rmtree(old)",
      "        shutil.rmtree(old)\n        if False:\n            pass", CHECKPOINT,
      "an interrupted swap's .old (the last good copy) removed"),
    M("dck-no-state-fsync", "train/dist_checkpoint.py",
      "write_text_synced(tmp / STATE_FILE, json.dumps({\"format\": FORMAT, **state}, indent=1, sort_keys=True))",
      "(tmp / STATE_FILE).write_text(json.dumps({\"format\": FORMAT, **state}, indent=1, sort_keys=True))",
      DIST, "train_state.json not fsynced"),
    M("dck-no-marker-fsync", "train/dist_checkpoint.py", "write_text_synced(tmp / MARKER, \"ok\\n\")",
      "(tmp / MARKER).write_text(\"ok\\n\")", DIST, "COMPLETE not fsynced"),
    M("dck-no-dir-fsync-before-marker", "train/dist_checkpoint.py",
      "sort_keys=True))\n        fsync_dir(tmp)\n", "sort_keys=True))\n", DIST,
      "COMPLETE written before the other entries are durable"),
    M("dck-no-sync-files", "train/dist_checkpoint.py", "checkpoint_id=str(tmp))\n    dist.barrier()",
      "checkpoint_id=str(tmp), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=False))\n"
      "    dist.barrier()", DIST, "DCP shards written without fsync"),
    # ---- plan and validation (ops/plan.py, ops/validate.py)
    M("plan-ignores-backend", "ops/plan.py",
      'name = resolve_backend(\n        "segment_attention", backend, prefix_lens.device',
      'name = resolve_backend(\n        "segment_attention", None, prefix_lens.device', PLAN,
      "segment plan ignores the requested backend"),
    M("plan-max-len-unchecked", "ops/plan.py", '_check_bound("max_len", max_len, kv_capacity)',
      '_check_bound("max_len", max_len, 2**62)', PLAN, "decode max_len bound not checked against kv_capacity"),
    M("plan-window-keeps-backend", "ops/plan.py", "        if window == self.window:\n            return self\n"
      "        validate.check_options(self.softcap, window, self.scale)\n        feats = _features(self.softcap, window, "
      "self.return_lse, self.backward)", "        return dataclasses.replace(self, window=window, mask_cache={})\n"
      "        feats = _features(self.softcap, window, self.return_lse, self.backward)", PLAN,
      "with_window neither re-checks the window nor the backend"),
    M("plan-short-prefix-accepted", "ops/plan.py", "if k_prefix.shape[2] < self.max_prefix_len:",
      "if k_prefix.shape[2] < self.max_prefix_len - 1:", PLAN, "a prefix one key short of the plan accepted"),
    M("val-range-off-by-one", "ops/validate.py", "if lo < low or hi > high:", "if lo < low or hi > high + 1:",
      PLAN, "index values one past the end accepted"),
    M("val-row-high-ignored", "ops/validate.py", "if row_high is not None and read[2]:", "if False:", PLAN,
      "per-request prefix limit not checked"),
    M("val-softcap-zero", "ops/validate.py", "math.isfinite(softcap) and softcap > 0", "math.isfinite(softcap) "
      "and softcap >= 0", PLAN, "softcap 0 accepted"),
]


def _selection(tests: tuple[str, ...], tree: Path) -> tuple[list[str], list[str]]:
    """(pytest arguments, missing files) for ``tests`` in the copy ``tree``."""
    files, keys, missing = [], [], []
    for t in tests:
        f, _, k = t.partition("::k=")
        if (tree / f).is_file():
            files.append(f)
            if k:
                keys.append(f"({k})" if len(tests) == 1 else k)
        else:
            missing.append(f)
    args = list(files)
    if keys:  # a -k applies to every file: keep the other files' tests by their file names
        others = [Path(f).stem for f, t in zip(files, tests, strict=False) if "::k=" not in t]
        args += ["-k", " or ".join([f"({k})" for k in keys] + others)]
    return args, missing


def _pytest(
    tree: Path, args: list[str], deselect: list[str], timeout: float, stop_first: bool = True
) -> tuple[str, float, list[str]]:
    """Run pytest in ``tree``: ("pass" | "fail" | "timeout" | "none", seconds, failed node ids)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    xml = tree / ".mutant-junit.xml"
    cmd = [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider", "-m", "not slow and not cuda",
           f"--junitxml={xml}", *args, *[a for d in deselect for a in ("--deselect", d)]]  # fmt: skip
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, []
    secs = time.monotonic() - t0
    failed = []
    if xml.is_file():
        for case in ET.parse(xml).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
                failed.append(f"{path}::{case.get('name')}")
    if r.returncode == 5:
        return "none", secs, failed
    return ("pass" if r.returncode == 0 else "fail"), secs, failed


def _copy_tree(dst: Path, tests_ref: str | None) -> None:
    shutil.copytree(ROOT / PKG, dst / PKG, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    if tests_ref is None:
        shutil.copytree(ROOT / "tests", dst / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_ref, "tests"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--tests-ref", help="take tests/ from this git commit (e.g. to measure the suite before a change)")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (a timeout counts as caught)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = ap.parse_args(argv)
    chosen = MUTANTS
    if a.only:
        want = set(a.only.split(","))
        unknown = want - {m.id for m in MUTANTS}
        if unknown:
            ap.error(f"--only: unknown mutant ids {sorted(unknown)}")
        chosen = [m for m in MUTANTS if m.id in want]
    if a.list:
        for m in chosen:
            print(f"{m.id:32} {m.file:28} {m.what}")
        return 0
    for m in chosen:  # stale mutants are an error before anything runs
        n = (ROOT / PKG / m.file).read_text(encoding="utf-8").count(m.old)
        if n != 1:
            print(f"error: mutant {m.id}: its text occurs {n} times in {PKG}/{m.file} (update tools/mutants.py)")
            return 2
    verdict = {"fail": "caught", "timeout": "caught (timeout)", "pass": "SURVIVED", "none": "SURVIVED (no tests)"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cacheaug-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree, a.tests_ref)
        probe = subprocess.run([sys.executable, "-c", f"import {PKG}; print({PKG}.__file__)"], cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)  # fmt: skip
        if not probe.stdout.strip().startswith(str(tree)):
            print(f"error: the copy's package is not the one imported: {probe.stdout}{probe.stderr}")
            return 2
        baseline: dict[tuple[str, ...], list[str]] = {}
        for m in chosen:
            args, missing = _selection(m.tests, tree)
            if m.tests not in baseline:
                if not args:
                    baseline[m.tests] = []
                else:
                    status, secs, failed = _pytest(tree, args, [], a.timeout, stop_first=False)
                    baseline[m.tests] = failed  # tests that fail unmutated are deselected, and reported
                    if status not in ("pass", "fail"):
                        print(f"error: the unmutated selection {m.tests} gave {status}")
                        return 2
                    if failed:
                        print(f"note: {len(failed)} test(s) fail unmutated and are deselected: {failed}")
            target = tree / PKG / m.file
            original = target.read_text(encoding="utf-8")
            if not args:
                status, secs = "none", 0.0
            else:
                target.write_text(original.replace(m.old, m.new), encoding="utf-8")
                try:
                    status, secs, _ = _pytest(tree, args, baseline[m.tests], a.timeout)
                finally:
                    target.write_text(original, encoding="utf-8")
            files = " ".join(Path(f).name for f in (t.partition("::k=")[0] for t in m.tests) if f not in missing)
            rows.append((m.id, f"{PKG}/{m.file}", m.what, files or "-", verdict[status], f"{secs:.0f}"))
            print(f"{m.id:32} {verdict[status]:18} {secs:6.1f} s", flush=True)
    head = ("mutant", "module", "planted bug", "tests run", "result", "s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    survived = [r for r in rows if r[4].startswith("SURVIVED")]
    lines.append("")
    names = ", ".join(r[0] for r in survived) or "none"
    lines.append(f"{len(rows) - len(survived)} of {len(rows)} caught; survived: {names}")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n", encoding="utf-8")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
