"""The prepared GPU check (bench/gpu_check.py) and the bench's --budget-s plans, on the CPU.

The full CPU rehearsal (`bash bench/gpu_check.sh OUT --rehearse`) takes minutes; here: the
budget scaling, the targets' verdicts on planted figures, the parsers of what pytest,
compute-sanitizer and ncu write, and the script end to end with the cheap steps.
"""

from __future__ import annotations

import json

import pytest
from cacheaug_engine.bench import budget, cli, gpu_check, gpu_steps, shapes, targets

SHARES = {p: cli.BUDGET_SHARES[p] for p in ("segment", "decode_attention", "cascade", "merge", "train",
                                              "decode_e2e")}


def test_budget_scales_shapes_and_repeats_and_keeps_target_shapes_first():
    plans = [budget.plan_for_budget(b, "cuda", shares=SHARES) for b in (30, 120, 300, 420, 540, 3000)]
    for small, big in zip(plans, plans[1:], strict=False):
        assert len(big.segment) >= len(small.segment) and big.repeats >= small.repeats
        assert len(big.decode) >= len(small.decode) and len(big.train) >= len(small.train)
    assert plans[0].repeats < plans[-1].repeats and len(plans[0].segment) < len(plans[-1].segment)
    first = plans[0].segment[0]
    assert (first.model, first.t, first.n, first.s) == ("llama3-8b", 8192, 64, 31)
    wanted = shapes.target_segment_shapes()
    assert plans[-1].segment[: len(wanted)] == wanted and plans[-1].level == "targets+quick"
    for p in plans:  # every plan judges the decode and cascade targets
        assert set(shapes.target_decode_shapes()) <= set(p.decode)
        assert set(shapes.target_cascade_shapes()) <= set(p.cascade)
        assert {"default", "flex", "peer:naive_loop"} <= set(p.train_names)
    cpu = budget.plan_for_budget(3000, "cpu", shares=SHARES)
    assert cpu.level == "smoke" and all(s.t < 1024 for s in cpu.segment)


def test_target_shapes_are_the_issues():
    seg = shapes.target_segment_shapes()
    assert len(seg) == len(set(seg)) == 12
    assert {(s.model, s.t, s.s, s.n) for s in seg} == {
        (m, t, s, 64) for m in ("gemma2-2b", "llama3-8b", "smollm2-135m") for t in (2048, 8192) for s in (31, 79)}
    assert all(d.t >= 32768 for d in shapes.target_decode_shapes())
    assert {(c.t, c.b) for c in shapes.target_cascade_shapes()} == {(16384, 32)}


@pytest.mark.parametrize("bad", [0, 5, float("nan"), "x"])
def test_bad_budget_is_refused_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--budget-s"):
        budget.plan_for_budget(bad, "cuda")


def test_bench_cli_refuses_both_budget_flags(tmp_path, capsys):
    rc = cli.main(["recipe", "--budget-s", "60", "--time-budget", "60", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "--budget-s or --time-budget" in capsys.readouterr().err


def _rec(op, backend, shape, ms, status="ok", **kw):
    return {"op": op, "backend": backend, "shape": shape, "ms": ms, "status": status, **kw}


def _doc():
    seg = {"model": "llama3-8b", "t": 8192, "n": 64, "s": 31, "b": 1}
    seg2 = {"model": "gemma2-2b", "t": 2048, "n": 64, "s": 79, "b": 1}
    off = {"model": "llama3-8b", "t": 1024, "n": 64, "s": 31, "b": 1}  # not a target shape
    dec = {"model": "llama3-8b", "t": 32768, "b": 16}
    cas = {"model": "llama3-8b", "t": 16384, "b": 32, "suffix": 320}
    recs = [
        _rec("segment_attention.fwdbwd", "triton", seg, 1.0), _rec("segment_attention.fwdbwd", "peer:flex_compiled",
                                                                    seg, 2.0),
        _rec("segment_attention.fwdbwd", "peer:sdpa_dense", seg, 12.0),
        _rec("segment_attention.fwdbwd", "triton", seg2, 1.0),
        _rec("segment_attention.fwdbwd", "peer:flex_compiled", seg2, 1.4),  # 1.4x < 1.5x: not met
        _rec("segment_attention.fwdbwd", "peer:sdpa_dense", seg2, 0, status="oom: CUDA out of memory"),
        _rec("segment_attention.fwdbwd", "triton", off, 1.0), _rec("segment_attention.fwdbwd", "peer:flex_compiled",
                                                                    off, 0.1),
        _rec("segment_attention.fwd", "triton", seg, 1.0, tflops=450.0),
        _rec("decode_attention", "cuda", dec, 1.0, gbps=3900.0),
        _rec("decode_attention", "triton", dec, 2.0, gbps=1950.0),
        _rec("cascade_decode", "cuda", cas, 1.0), _rec("cascade_decode", "peer:decode_copies", cas, 25.0),
        _rec("train_step", "default", {"model": "smollm2-135m", "N": 64}, 10.0),
        _rec("train_step", "peer:naive_loop", {"model": "smollm2-135m", "N": 64}, 150.0),
        _rec("train_step", "flex", {"model": "smollm2-135m", "N": 64}, 0, status="error: RuntimeError: boom"),
    ]
    return {"peaks": {"matmul_tflops": 800.0, "copy_gbps": 4300.0}, "records": recs}


def test_targets_verdicts_on_planted_figures():
    v = targets.evaluate([_doc()])
    flex = v["segment_fwdbwd_vs_flex"]
    assert flex["status"] == "not met" and flex["worst"] == pytest.approx(1.4) and flex["shapes"] == 2
    sdpa = v["segment_fwdbwd_vs_sdpa_dense"]
    assert sdpa["status"] == "met" and sdpa["measured_shapes"] == 1
    assert any("oom" in (e.get("why") or "") for e in sdpa["entries"])
    assert v["segment_fwd_pct_matmul_peak"]["status"] == "met"  # 450 / 800 = 56%
    assert v["segment_fwd_pct_matmul_peak"]["worst"] == pytest.approx(56.25)
    dec = v["decode_pct_copy_bw"]  # the fastest of ours: cuda, 3900 / 4300 = 90.7%
    assert dec["status"] == "met" and dec["entries"][0]["ours"] == "cuda"
    assert v["cascade_vs_per_request_decode"]["worst"] == pytest.approx(25.0)
    assert v["train_vs_naive_loop"]["status"] == "met"
    assert v["train_vs_flex"]["status"] == "not measured" and "boom" in v["train_vs_flex"]["entries"][0]["why"]
    lines = targets.table(v)
    assert len(lines) == len(targets.TARGETS) and "not met" in lines[0]
    # no records at all: not measured, with the reason
    empty = targets.evaluate([{"peaks": {}, "records": []}])
    assert all(t["status"] == "not measured" and "why" in t for t in empty.values())


def test_junit_and_log_parsers(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_decode_cuda" name="test_a[x]" time="0.5"/>'
        '<testcase classname="tests.test_decode_cuda" name="test_b" time="0.1"><failure message="boom">tb'
        '</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c" time="0"><skipped message="no"/></testcase>'
        "</testsuite></testsuites>")
    s = gpu_steps.parse_junit(xml)
    assert (s["total"], s["passed"], s["failed"], s["skipped"]) == (3, 1, 1, 1)
    assert s["tests"][1] == {"id": "tests/test_decode_cuda.py::test_b", "outcome": "failed", "seconds": 0.1,
                             "message": "boom"}
    assert gpu_steps.parse_junit(tmp_path / "missing.xml") is None
    log = ("tests/test_a.py::test_x[1] PASSED [ 50%]\n[gw0] [ 75%] FAILED tests/test_a.py::test_y \n"
           "==== 1 failed, 1 passed in 3.0s ====\n")
    p = gpu_steps.parse_pytest_log(log)
    assert (p["total"], p["passed"], p["failed"]) == (2, 1, 1) and p["summary_line"].startswith("====")


def test_sanitizer_and_ncu_parsers():
    mem = gpu_steps.sanitizer_summary("========= ERROR SUMMARY: 3 errors\n")
    assert mem["error_summary"] == 3
    race = gpu_steps.sanitizer_summary("RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
                                        "========= ERROR SUMMARY: 1 error\n")
    assert (race["hazards"], race["race_errors"], race["race_warnings"]) == (2, 1, 1)
    csv = ('==PROF== Connected\n"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
           '"0","_fwd_kernel","GPU Speed Of Light Throughput","DRAM Throughput","%","41.2"\n'
           '"0","_fwd_kernel","GPU Speed Of Light Throughput","Duration","us","812"\n'
           '"1","_fwd_kernel","GPU Speed Of Light Throughput","Duration","us","800"\n')
    launches = gpu_steps.parse_ncu_csv(csv)
    assert len(launches) == 2 and launches[0]["metrics"]["DRAM Throughput"] == "41.2 %"


def test_sanitizer_selection_names_existing_cuda_tests():
    from pathlib import Path

    root = Path(gpu_check.ROOT)
    for node in gpu_steps.SANITIZER_TESTS:
        path, name = node.split("::")
        func = name.split("[")[0]
        assert f"def {func}(" in (root / path).read_text(), node


def test_gpu_check_rehearsal_writes_json_and_few_files(tmp_path, capsys):
    out = tmp_path / "out"
    rc = gpu_check.main([str(out), "--rehearse", "--budget-s", "60", "--steps", "ncu"])
    assert rc == 0
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["schema"] == gpu_check.SCHEMA and doc["mode"] == "rehearsal"
    assert list(doc["steps"]) == list(gpu_check.STEPS)
    assert all(doc["steps"][s]["status"] == "skipped" for s in gpu_check.STEPS)
    assert doc["steps"]["install"]["reason"] == "not requested (--steps)"
    for key in ("gpu", "driver", "torch", "triton", "torch_cuda", "commit", "python", "nvcc"):
        assert key in doc["env"]
    assert doc["targets"]["status"] == "not measured"
    files = list(out.iterdir())
    assert len(files) <= gpu_check.MAX_FILES and all(f.is_file() for f in files)
    assert "gpu_check rehearsal" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [(["--budget-s", "5"], "--budget-s"), (["--steps", "install,nope"], "--steps"),
                                      (["--maxfail", "0"], "--maxfail")])
def test_gpu_check_refuses_bad_arguments(tmp_path, capsys, argv, msg):
    assert gpu_check.main([str(tmp_path / "o"), "--rehearse", *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_extract_writes_the_result_documents(tmp_path):
    res = {"device": "NVIDIA H200", "date": "2026-12-03T10:00:00+00:00", "records": []}
    doc = {"steps": {"bench": {"results": res}, "train": {"status": "skipped"}}}
    src = tmp_path / "gpu_check.json"
    src.write_text(json.dumps(doc))
    written = gpu_check.extract(src, tmp_path / "results")
    assert [p.name for p in written] == ["nvidia-h200-2026-12-03.json"]
    assert json.loads(written[0].read_text()) == res
