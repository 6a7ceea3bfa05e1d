"""tools/nl_sweep.py report: the table holds each N_L's figures from its task-eval output, rows of
an earlier report fill in N_L whose run dirs are gone (marked), and another budget is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("decoder", "coprocessor", "pause", "shuffled", "mean")


def _tool():
    spec = importlib.util.spec_from_file_location("nl_sweep", ROOT / "tools" / "nl_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _task_eval(nl: int, steps: int, pause_exact: float) -> dict:
    ms = {m: {"answer_ppl": 2.0 + i + nl / 100, "ppl_by_position": [3.0, 2.0], "exact_match": 0.1 * i,
              "exact_match_ci": [0.0, 0.5]} for i, m in enumerate(METHODS)}
    ms["pause"]["exact_match"] = pause_exact
    paired = {f"coprocessor vs {m}": {"ppl_change_pct": [-float(nl), -nl - 1.0, -nl + 1.0],
                                      "exact_match": {"diff": 0.1 * nl, "lo": 0.0, "hi": 0.2 * nl, "p_value": 0.5}}
              for m in METHODS if m != "coprocessor"}
    return {"methods": ms, "paired": paired, "train_config": {"steps": steps}, "checkpoint": f"nl{nl}",
            "seconds": 1.0, "digits": 3, "shots": 4, "problems": 128, "num_latents": nl}


def _run_dir(root: Path, nl: int, steps: int) -> None:
    (root / f"nl{nl}-eval").mkdir(parents=True)
    (root / f"nl{nl}-eval" / "task_eval.json").write_text(json.dumps(_task_eval(nl, steps, 0.25)))
    for kind in ("cop", "pause"):
        (root / f"nl{nl}-{kind}" / "checkpoint").mkdir(parents=True)
        hist = [{"loss": 1.0 + k / 10} for k in range(steps)]
        (root / f"nl{nl}-{kind}" / "checkpoint" / "state.json").write_text(json.dumps({"history": hist}))


def test_report_rows_figures_and_prior(tmp_path):
    tool = _tool()
    root = tmp_path / "runs" / "addition"
    _run_dir(root, 2, 10)
    (root / "commands.txt").write_text("t1  train nl2\n")
    prior_row = tool._row(1, _task_eval(1, 10, 0.0), None, "N_L 1")
    prior = tmp_path / "old.json"
    extra_row = tool._row(4, _task_eval(4, 200, 0.0), None, "shipped N_L 4 (200 steps)")
    prior.write_text(json.dumps({"rows": [prior_row, extra_row], "commands": ["t0  train nl1"]}))
    out = tmp_path / "rep"
    tool.main(["report", "--task", "addition", "--nl", "1", "2", "4", "--root", str(tmp_path / "runs"),
               "--out", str(out), "--prior", str(prior)])
    rep = json.loads(out.with_suffix(".json").read_text())
    # N_L 4: neither a run dir nor a prior row; the prior's row of another budget comes along
    assert [r["label"] for r in rep["rows"]] == ["N_L 1", "N_L 2", "shipped N_L 4 (200 steps)"]
    assert rep["rows"][0]["source"] == str(prior) and "source" not in rep["rows"][1]
    assert rep["commands"] == ["t0  train nl1", "t1  train nl2"]
    assert rep["rows"][1]["train_loss_last10"]["cop"] == pytest.approx(1.45)
    md = out.with_suffix(".md").read_text().splitlines()
    row2 = next(ln for ln in md if ln.startswith("| N_L 2 "))
    assert "-2.0% [-3.0, -1.0]" in row2  # vs pause
    assert "/ 25.0% /" in row2  # the pause table's exact match
    assert row2.endswith("| +20.0 [+0.0, +40.0] | +20.0 [+0.0, +40.0] |")  # exact diffs vs pause, shuffled
    assert out.with_suffix(".png").stat().st_size > 0


def test_prior_rows_of_another_budget_are_refused(tmp_path):
    tool = _tool()
    root = tmp_path / "runs" / "addition"
    _run_dir(root, 2, 10)
    (root / "commands.txt").write_text("")
    prior = tmp_path / "old.json"
    prior.write_text(json.dumps({"rows": [tool._row(1, _task_eval(1, 200, 0.0), None, "N_L 1")], "commands": []}))
    with pytest.raises(SystemExit, match="another number of steps"):
        tool.main(["report", "--task", "addition", "--nl", "1", "2", "--root", str(tmp_path / "runs"),
                   "--out", str(tmp_path / "rep"), "--prior", str(prior)])
