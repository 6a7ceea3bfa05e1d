"""The N_L sweep on a reasoning task (issue 24): coprocessor and pause table at each N_L on the same
budget (steps, data, schedule, seed), then held-out problems scored against the controls.

    python tools/nl_sweep.py run --task addition --nl 1 2 4 8 16 --steps 100 --root runs/nlsweep
    python tools/nl_sweep.py report --task addition --root runs/nlsweep --out docs/nl-sweep-addition

``run`` trains two jobs side by side (one thread each), resuming any run that stopped (``--resume``;
a finished run is skipped), then runs ``cacheaug task-eval`` for each N_L. ``report`` writes
OUT.json (every figure), OUT.md (the table) and OUT.png (the coprocessor's answer-perplexity change
against pause, shuffled and mean, with 95% intervals, against N_L; exact match beside it).
Every command it runs is printed and recorded in ROOT/TASK/commands.txt. ``report --prior OLD.json``
takes the rows of N_L whose run dirs are gone (another machine, a cleaned tree) from an earlier
report made by the same commands, and its ``--extra`` rows, marked with their source, and keeps its commands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# the addition recipe of cacheaug_engine/assets/addition-coprocessor/COMMAND.md
RECIPE = ["--placement", "early", "--ahead", "8", "--positions", "8", "--min-prefix", "8", "--seq-len", "64",
          "--batch-size", "4", "--lora-rank", "8", "--lr", "3e-3", "--warmup", "10", "--save-every", "10",
          "--eval-every", "0", "--seed", "0", "--threads", "1"]


def _cacheaug(*args: str) -> list[str]:
    return [sys.executable, "-m", "cacheaug_engine.cli", *args]


def _log(root: Path, cmd: list[str]) -> None:
    line = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    print("$", line, flush=True)
    with (root / "commands.txt").open("a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {line}\n")


def _done_steps(run: Path) -> int:
    st = run / "checkpoint" / "state.json"
    if not st.is_file():
        return -1
    return int(json.loads(st.read_text())["step"])


def _train_cmd(root: Path, data: Path, nl: int, kind: str, steps: int) -> list[str] | None:
    run = root / f"nl{nl}-{kind}"
    done = _done_steps(run)
    if done >= steps:
        return None
    cmd = _cacheaug("train", "--data", str(data), "--num-latents", str(nl), *RECIPE, "--steps", str(steps),
                    "--out", str(run))
    if kind == "pause":
        cmd += ["--latents", "pause"]
    if done >= 0:
        cmd.append("--resume")
    return cmd


def run(a: argparse.Namespace) -> None:
    root = a.root / a.task
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{a.task}.jsonl"
    if not data.exists():
        cmd = _cacheaug("tasks", a.task, "--out", str(data), "--digits", str(a.digits))
        _log(root, cmd)
        subprocess.run(cmd, check=True)
    queue = [c for nl in a.nl for kind in ("cop", "pause") if (c := _train_cmd(root, data, nl, kind, a.steps))]
    running: list[tuple[subprocess.Popen[bytes], Path]] = []
    while queue or running:
        while queue and len(running) < a.parallel:
            cmd = queue.pop(0)
            _log(root, cmd)
            log = root / (cmd[cmd.index("--out") + 1].rsplit("/", 1)[-1] + ".log")
            running.append((subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT), log))
        time.sleep(5)
        for p, log in list(running):
            if p.poll() is not None:
                running.remove((p, log))
                if p.returncode != 0:
                    raise SystemExit(f"training failed (exit {p.returncode}); see {log}")
    for nl in a.nl:
        out = root / f"nl{nl}-eval"
        if (out / "task_eval.json").exists():
            continue
        cmd = _cacheaug("task-eval", str(root / f"nl{nl}-cop" / "checkpoint"), "--pause",
                        str(root / f"nl{nl}-pause" / "checkpoint"), "--task", a.task, "--digits", str(a.digits),
                        "--problems", str(a.problems), "--shots", str(a.shots), "--out", str(out), "--device", "cpu",
                        "--batch-size", "16")
        _log(root, cmd)
        subprocess.run(cmd, check=True)


def _row(nl: int, res: dict[str, Any], root: Path | None, label: str = "") -> dict[str, Any]:
    ms, pd = res["methods"], res["paired"]
    hist = {}
    for kind in ("cop", "pause") if root is not None else ():
        st = json.loads((root / f"nl{nl}-{kind}" / "checkpoint" / "state.json").read_text())
        hist[kind] = [h["loss"] for h in st.get("history", [])]
    return {
        "num_latents": nl,
        "label": label or f"N_L {nl}",
        "steps": res["train_config"]["steps"],
        "checkpoint": res.get("checkpoint"),
        "answer_ppl": {m: v["answer_ppl"] for m, v in ms.items()},
        "ppl_by_position": {m: v["ppl_by_position"] for m, v in ms.items()},
        "exact_match": {m: [v["exact_match"], *v["exact_match_ci"]] for m, v in ms.items()},
        "ppl_change_pct": {k.split(" vs ")[1]: v["ppl_change_pct"] for k, v in pd.items()},
        "exact_diff": {k.split(" vs ")[1]: [v["exact_match"][x] for x in ("diff", "lo", "hi", "p_value")]
                       for k, v in pd.items()},
        "train_loss_last10": {k: sum(h[-10:]) / max(len(h[-10:]), 1) for k, h in hist.items()},
        "eval_seconds": res.get("seconds"),
    }


def report(a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = a.root / a.task
    rows, first = [], None
    prior = json.loads(a.prior.read_text()) if a.prior else {"rows": [], "commands": []}
    for nl in a.nl:
        f = root / f"nl{nl}-eval" / "task_eval.json"
        if not f.exists():
            # a row measured earlier by the same commands (its report's JSON), when these run dirs are gone
            old = [r for r in prior["rows"] if r["num_latents"] == nl and r["label"] == f"N_L {nl}"]
            if old:
                rows.append({**old[0], "source": str(a.prior)})
            else:
                print(f"missing {f}: N_L {nl} left out", file=sys.stderr)
            continue
        res = json.loads(f.read_text())
        first = first or res
        rows.append(_row(nl, res, root))
    # the earlier report's rows of another budget (its --extra runs), unless given again
    rows += [{**r, "source": str(a.prior)} for r in prior["rows"] if not r["label"].startswith("N_L ")
             and not any(r["label"].startswith(spec.partition("=")[0]) for spec in a.extra)]
    for spec in a.extra:  # LABEL=DIR: a task_eval.json of another budget, shown apart
        label, _, d = spec.partition("=")
        res = json.loads((Path(d) / "task_eval.json").read_text())
        rows.append(_row(int(res["num_latents"]), res, None, f"{label} ({res['train_config']['steps']} steps)"))
    if not rows or first is None:
        raise SystemExit("no evaluated N_L")
    steps = first["train_config"]["steps"]
    if any(r["steps"] != steps for r in rows if r.get("source") and r["label"].startswith("N_L ")):
        raise SystemExit(f"--prior: its rows were trained for another number of steps than {steps}")
    here = (root / "commands.txt").read_text().splitlines()
    meta = {"task": a.task, "digits": first["digits"], "shots": first["shots"], "problems": first["problems"],
            "steps": steps, "recipe": RECIPE, "commands": [c for c in prior["commands"] if c not in here] + here}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    head = ("| run | decoder | pause | coprocessor | shuffled | mean | vs pause | vs shuffled | vs mean | vs decoder "
            "| exact: cop / pause / shuffled / decoder | exact diff vs pause | exact diff vs shuffled |")
    lines = [f"{a.task}, {first['digits']} digits, {first['shots']} shots, {first['problems']} held-out problems; "
             f"{steps} training steps per run. Answer perplexity; change of the coprocessor's answer perplexity "
             "[95% paired bootstrap]; exact match (greedy) and the coprocessor's paired exact-match difference, "
             "points [95%].", "", head, "|" + "---|" * 13]
    for r in rows:
        p, c, e = r["answer_ppl"], r["ppl_change_pct"], r["exact_match"]
        cells = [f"{p.get(m, float('nan')):.3f}" for m in ("decoder", "pause", "coprocessor", "shuffled", "mean")]
        ch = [f"{c[m][0]:+.1f}% [{c[m][1]:+.1f}, {c[m][2]:+.1f}]" for m in ("pause", "shuffled", "mean", "decoder")]
        ex = " / ".join(f"{100 * e[m][0]:.1f}%" for m in ("coprocessor", "pause", "shuffled", "decoder"))
        ed = [f"{100 * r['exact_diff'][m][0]:+.1f} [{100 * r['exact_diff'][m][1]:+.1f}, "
              f"{100 * r['exact_diff'][m][2]:+.1f}]" for m in ("pause", "shuffled")]
        lines.append(f"| {r['label']} | " + " | ".join(cells + ch) + f" | {ex} | " + " | ".join(ed) + " |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    same = [r for r in rows if r["steps"] == steps]  # the sweep's budget: joined by lines
    other = [r for r in rows if r["steps"] != steps]  # --extra runs of another budget: open markers
    for m, col in (("pause", "C0"), ("shuffled", "C1"), ("mean", "C2")):
        for group, style in ((same, dict(marker="o")), (other, dict(marker="D", mfc="none", ls="none"))):
            if not group:
                continue
            y = [r["ppl_change_pct"][m][0] for r in group]
            err = [[y[i] - r["ppl_change_pct"][m][1] for i, r in enumerate(group)],
                   [r["ppl_change_pct"][m][2] - y[i] for i, r in enumerate(group)]]
            tag = "" if group is same else f" ({', '.join(r['label'] for r in group)})"
            ax.errorbar([r["num_latents"] for r in group], y, yerr=err, capsize=3, color=col,
                        label=f"coprocessor vs {m}{tag}", **style)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N_L (latents)")
    ax.set_ylabel("answer perplexity change, % (< 0: coprocessor better)")
    ax.set_title(f"{a.task}: gain over the controls by N_L ({steps} steps)")
    ax.legend()
    x = [r["num_latents"] for r in rows]
    for m, col in (("coprocessor", "C3"), ("pause", "C0"), ("shuffled", "C1"), ("decoder", "k")):
        y = [100 * r["exact_match"][m][0] for r in rows]
        err = [[y[i] - 100 * r["exact_match"][m][1] for i, r in enumerate(rows)],
               [100 * r["exact_match"][m][2] - y[i] for i, r in enumerate(rows)]]
        bx.errorbar(x, y, yerr=err, marker="o", ls="none", capsize=3, color=col, label=m)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("N_L (latents)")
    bx.set_ylabel("exact match, % (95% Clopper-Pearson)")
    bx.set_title("greedy exact match of the answer")
    bx.legend()
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)
    print(f"wrote {a.out.with_suffix('.json')}, .md, .png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--task", default="addition", choices=("addition", "multistep"))
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--nl", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--parallel", type=int, default=2, help="training jobs side by side (one thread each)")
    p.add_argument("--root", type=Path, default=Path("runs/nlsweep"))
    p.add_argument("--out", type=Path, default=Path("docs/nl-sweep"))
    p.add_argument("--extra", nargs="*", default=[], metavar="LABEL=DIR",
                   help="report: task-eval outputs of another budget (e.g. a shipped pair), shown apart")
    p.add_argument("--prior", type=Path, default=None, metavar="JSON",
                   help="report: an earlier report's JSON; its N_L rows fill in N_L whose run dirs are gone")
    a = p.parse_args(argv)
    run(a) if a.action == "run" else report(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
