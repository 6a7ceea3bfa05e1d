"""The offline reasoning tasks (GSM-Symbolic split by template, arithmetic), their shipped lm-eval YAMLs,
``cacheaug tasks``, and the paired statistics of ``cacheaug lm-eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cacheaug_engine.eval.paired import clopper_pearson, exact_paired_binary, paired_bootstrap, paired_difference


def test_clopper_pearson_and_exact_paired_test():
    # reference values: scipy.stats.beta.ppf(0.025, k, n-k+1), beta.ppf(0.975, k+1, n-k) and binomtest(k, n)
    assert clopper_pearson(3, 10) == pytest.approx((0.0667395111777345, 0.6524528500599973), abs=1e-9)
    assert clopper_pearson(0, 5) == pytest.approx((0.0, 0.5218237501049814), abs=1e-9)
    assert clopper_pearson(10, 10) == pytest.approx((0.6915028921812392, 1.0), abs=1e-9)
    a = np.array([1] * 24 + [0] * 17 + [1] * 30 + [0] * 29, dtype=float)
    b = np.array([0] * 24 + [1] * 17 + [1] * 30 + [0] * 29, dtype=float)
    r = exact_paired_binary(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (24, 17, 100)
    assert r["diff"] == pytest.approx(0.07) and r["p_value"] == pytest.approx(0.34888887944907765, abs=1e-12)
    lo, hi = clopper_pearson(24, 41)
    assert (r["lo"], r["hi"]) == pytest.approx((41 / 100 * (2 * lo - 1), 41 / 100 * (2 * hi - 1)))
    same = exact_paired_binary([1, 0, 1], [1, 0, 1])
    assert (same["diff"], same["lo"], same["hi"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert paired_difference([1, 0], [0, 0])["method"] == "exact"
    with pytest.raises(ValueError, match="same documents"):
        exact_paired_binary([1, 0], [1])


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 300)
    a, b = base + 0.5 + rng.normal(0, 0.1, 300), base  # paired: the shared noise cancels
    r = paired_bootstrap(a, b, iters=2000)
    assert r["method"] == "bootstrap" and r["lo"] < r["diff"] < r["hi"]
    assert 0.47 < r["lo"] and r["hi"] < 0.53 and r["p_value"] == 0.0
    assert paired_bootstrap(a, b, iters=2000) == r  # seeded
    assert paired_difference(a, b)["method"] == "bootstrap"


def test_arithmetic_docs_never_repeat_a_training_pair():
    from cacheaug_engine.data.reasoning import ADDITION_TRAIN, arithmetic_docs
    from cacheaug_engine.data.tasks import task_documents

    test = arithmetic_docs("test", 300)
    train = arithmetic_docs("train", 300)
    trained = {tuple(map(int, line.split("=")[0].split("+"))) for doc in task_documents("addition", **ADDITION_TRAIN)
               for line in doc.split("\n")}
    pairs = {(d["a"], d["b"]) for d in test}
    assert len(pairs) == 300 and not pairs & trained and not pairs & {(d["a"], d["b"]) for d in train}
    for d in test:
        assert d["question"] == f"{d['a']}+{d['b']}=" and d["answer"] == str(d["a"] + d["b"])
        assert d["choices"][d["gold"]] == d["answer"] and len(set(d["choices"])) == 4
    assert arithmetic_docs("test", 300) == test  # reproducible


def test_gsm_symbolic_split_by_template():
    pytest.importorskip("reasoning_gym")
    from cacheaug_engine.data.reasoning import gsm_symbolic_docs, gsm_templates

    t = gsm_templates()
    assert not set(t["train"]) & set(t["test"]) and len(t["test"]) >= 10 and len(t["train"]) >= 4 * len(t["test"])
    test, train = gsm_symbolic_docs("test", 40), gsm_symbolic_docs("train", 40)
    assert {d["template"] for d in test} <= set(t["test"]) and {d["template"] for d in train} <= set(t["train"])
    for d in test:
        assert d["solution"].rstrip().endswith(f"#### {d['answer']}")
        assert d["choices"][d["gold"]] == d["answer"] and len(set(d["choices"])) == 4
    assert gsm_symbolic_docs("test", 40) == test
    assert gsm_symbolic_docs("test", 40, seed=1) != test


def test_cacheaug_tasks_writes_documents_and_training_text(tmp_path, capsys):
    from cacheaug_engine.cli.main import main

    out = tmp_path / "arith.jsonl"
    assert main(["tasks", "arithmetic", "--split", "test", "--docs", "5", "--out", str(out)]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == 5 and {"question", "answer", "choices", "gold"} <= set(docs[0])
    assert main(["tasks", "arithmetic", "--docs", "2", "--per-doc", "3", "--as-text", "--out", str(out)]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(texts) == 2 and all(len(t.split("\n")) == 3 for t in texts)
    assert main(["tasks", "addition", "--docs", "2", "--out", str(out)]) == 0  # the old task, unchanged
    assert main(["tasks", "arithmetic", "--docs", "0", "--out", str(out)]) == 2
    assert "--docs" in capsys.readouterr().err


def test_shipped_task_yamls_index_and_load():
    pytest.importorskip("lm_eval")
    pytest.importorskip("reasoning_gym")
    from lm_eval.tasks import TaskManager, get_task_dict

    from cacheaug_engine.cli.lm_eval import TASK_DIR

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    names = {"cacheaug_gsm", "cacheaug_gsm_answer_ll", "cacheaug_gsm_solution_ll", "cacheaug_gsm_mc",
             "cacheaug_arith3", "cacheaug_arith3_ll", "cacheaug_arith3_mc"}
    assert names <= set(tm.all_tasks)
    tasks = get_task_dict(["cacheaug_gsm_mc", "cacheaug_arith3_ll"], tm)
    mc = tasks["cacheaug_gsm_mc"]
    doc = mc.test_docs()[0]
    assert mc.doc_to_choice(doc)[mc.doc_to_target(doc)] == doc["answer"]
    # few-shot examples come from the train templates only
    from cacheaug_engine.data.reasoning import gsm_templates

    assert {d["template"] for d in mc.fewshot_docs()} <= set(gsm_templates()["train"])
