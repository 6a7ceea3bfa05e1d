"""tools/paired_eval.py: B's paired perplexity change against A per position, from two eval.json files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("paired_eval", ROOT / "tools" / "paired_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eval(ce, label="x", n=None):
    return {"seq_len": 64, "heldout_sequences": n or len(ce),
            "results": [{"label": label, "per_sequence_ce": {"coprocessor": ce}}]}


def test_change_is_exp_of_the_mean_paired_difference(tmp_path, capsys):
    a = [[2.0, 1.0], [3.0, 1.5], [2.5, 1.2]]
    d = [[-0.1, 0.0], [-0.2, 0.1], [-0.3, 0.05]]
    b = [[x + y for x, y in zip(r, s, strict=True)] for r, s in zip(a, d, strict=True)]
    res = _tool().paired(_eval(a)["results"][0], _eval(b)["results"][0], "coprocessor", mean_upto=2)
    assert [r["position"] for r in res["rows"]] == ["1", "2", "mean 1-2"]
    assert res["rows"][0]["change_pct"][0] == pytest.approx(100 * math.expm1(-0.2))
    assert res["rows"][2]["change_pct"][0] == pytest.approx(100 * math.expm1((-0.2 + 0.05) / 2))
    lo, hi = res["rows"][0]["change_pct"][1:]
    assert lo < res["rows"][0]["change_pct"][0] < hi
    (tmp_path / "a.json").write_text(json.dumps(_eval(a, "A")))
    (tmp_path / "b.json").write_text(json.dumps(_eval(b, "B")))
    assert _tool().main([str(tmp_path / "a.json"), str(tmp_path / "b.json:0")]) == 0
    assert "B against A, 3 held-out sequences" in capsys.readouterr().out


def test_refuses_different_targets(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_eval([[1.0, 2.0]] * 3)))
    (tmp_path / "b.json").write_text(json.dumps(_eval([[1.0, 2.0]] * 2)))
    with pytest.raises(SystemExit, match="different held-out sets"):
        _tool().main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with pytest.raises(ValueError, match="different targets"):
        _tool().paired(_eval([[1.0]] * 3)["results"][0], _eval([[1.0, 2.0]] * 3)["results"][0], "coprocessor")
