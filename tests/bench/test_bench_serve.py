"""`cacheaug bench serve` (issue 27): arguments checked before vLLM or a model is loaded; the table."""

from __future__ import annotations

from cacheaug_engine.bench.serve import batch_prompts, table

from cacheaug_engine.cli.main import main


def test_bench_serve_checks_arguments_first(tmp_path, capsys) -> None:
    assert main(["bench", "serve"]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["bench", "serve", "--model", str(tmp_path), "--batches", "1,x"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["bench", "serve", "--model", str(tmp_path), "--batches", "0"]) == 2
    assert main(["bench", "serve", "--model", str(tmp_path), "--coprocessor", str(tmp_path / "no")]) == 2
    assert "--coprocessor" in capsys.readouterr().err


def test_prompts_are_distinct_per_round_and_table_renders() -> None:
    a, b = batch_prompts(32, 1), batch_prompts(32, 2)
    assert len(set(a)) == 32 and not set(a) & set(b)
    doc = {"rows": [{"engine": "vllm", "mode": "augmented", "batch": 8, "wall_s": 2.0, "requests_per_s": 4.0,
                     "tokens_per_s": 64.0, "coprocessor_s": 0.5, "coprocessor_share": 0.25}]}
    assert "| vllm | augmented | 8 | 2.0 | 4.0 | 64.0 | 0.5 (25 %) |" in table(doc)
