"""``cacheaug task-eval`` end to end on a tiny random decoder: a coprocessor and a pause table trained on
addition documents, scored on held-out problems; and its refusals (before any model load)."""

from __future__ import annotations

import json

import pytest
from reliability_setup import assert_one_error, forbid_model_load, run_cli, write_tiny_setup

from cacheaug_engine.cli.main import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskeval")
    common = write_tiny_setup(d)
    data = d / "add.jsonl"
    assert main(["tasks", "addition", "--docs", "40", "--digits", "2", "--out", str(data)]) == 0
    i = common.index("--data")
    common[i + 1] = str(data)
    for kind in ("cop", "pause"):
        extra = ["--latents", "pause"] if kind == "pause" else []
        assert main(["train", *common, "--steps", "2", "--out", str(d / kind), *extra]) == 0
    return d


def test_task_eval_writes_every_method_and_the_paired_differences(pair, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["task-eval", str(pair / "cop" / "checkpoint"), "--pause", str(pair / "pause" / "checkpoint"),
                 "--task", "addition", "--digits", "2", "--problems", "3", "--shots", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads((out / "task_eval.json").read_text())
    assert set(res["methods"]) == {"decoder", "coprocessor", "pause", "shuffled", "mean"}
    assert set(res["paired"]) == {f"coprocessor vs {m}" for m in ("decoder", "pause", "shuffled", "mean")}
    assert res["problems"] == 3 and all(len(v["exact"]) == 3 for v in res["per_problem"].values())
    assert res["num_latents"] == 2 and res["digits"] == 2
    assert "| coprocessor |" in (out / "task_eval.md").read_text()
    assert "answer ppl" in capsys.readouterr().out


def test_task_eval_refuses_swapped_checkpoints_before_loading(pair, tmp_path, capsys, monkeypatch):
    forbid_model_load(monkeypatch)
    cop, pause = str(pair / "cop" / "checkpoint"), str(pair / "pause" / "checkpoint")
    code, err = run_cli(["task-eval", pause, "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, "CKPT:", "is a pause table")
    code, err = run_cli(["task-eval", cop, "--pause", cop, "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, "--pause:", "not a pause-table checkpoint")
    code, err = run_cli(["task-eval", cop, "--problems", "1", "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, "--problems")
