"""Ahead-of-time compilation of the Triton kernels (`cacheaug kernels --compile`), without a GPU.

The compile tests build tiny kernels (tests/support/kernel_compile_cases.py) for sm_80 in worker
processes: a good one, a broken one, an oversized config and a worker crash each come back
as a record instead of crashing the sweep. The rest checks the pruning rule, the registry's
coverage of the specialisation axes, the parsers and the JSON/Markdown output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import triton
from cacheaug_engine.triton_kernels import compile_check as kernel_compile
from cacheaug_engine.triton_kernels import kernel_specs
from cacheaug_engine.triton_kernels import segment_attention_configs as cfgs

from cacheaug_engine.cli import kernels as kernels_cli
from cacheaug_engine.cli.main import main
from cacheaug_engine.tooling import cuda_resources, kernel_sweep

TESTS = Path(__file__).resolve().parents[1] / "support"  # kernel_compile_cases.py
CASES = "kernel_compile_cases:KERNELS"
RECORD_KEYS = {
    "kernel": str, "target": str, "spec": dict, "config": str, "meta": dict, "default": bool, "status": str,
}
OK_KEYS = {"registers": int, "spills": int, "spill_stores": int, "spill_loads": int, "shared_bytes": int,
           "smem_limit": int, "num_warps": int, "num_stages": int, "compile_s": float}

needs_ptxas = pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="this triton build ships no ptxas",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("triton-cache")


@pytest.fixture(scope="module")
def records(cache_dir):
    """One sweep over the test registry: copy, broken, matmul (default + oversized), crash; sm_80."""
    tasks = kernel_sweep.plan(_cases(), [80], all_configs=True)
    assert len(tasks) == 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(cache_dir))
        recs = kernel_sweep.run(tasks, workers=2, registry=CASES, extra_paths=[str(TESTS)])
    return {(r["kernel"], r["default"]): r for r in recs}


def _cases():
    import sys

    sys.path.insert(0, str(TESTS))
    try:
        import kernel_compile_cases
    finally:
        sys.path.remove(str(TESTS))
    return kernel_compile_cases.KERNELS


def _check_schema(rec):
    for key, typ in RECORD_KEYS.items():
        assert isinstance(rec[key], typ), (key, rec)
    assert rec["status"] in ("ok", "error")
    if rec["status"] == "ok":
        assert rec["error"] is None
        for key, typ in OK_KEYS.items():
            assert isinstance(rec[key], (int, float) if typ is float else typ), (key, rec)
    else:
        assert isinstance(rec["error"], str) and rec["error"]


@needs_ptxas
def test_good_kernel_compiles_with_resources(records):
    rec = records[("copy", True)]
    _check_schema(rec)
    assert rec["status"] == "ok" and rec["target"] == "sm_80"
    assert 0 < rec["registers"] <= 255 and rec["spills"] == 0
    assert rec["num_warps"] == 4 and rec["hgmma"] is None  # sm_80 has no warpgroup MMA


@needs_ptxas
def test_broken_kernel_is_an_error_record(records):
    rec = records[("broken", True)]
    _check_schema(rec)
    assert rec["status"] == "error" and "dot" in rec["error"].lower()
    assert any(line.startswith("broken sm_80") for line in kernel_sweep.failures(records.values()))


@needs_ptxas
def test_oversized_config_is_an_error_record(records):
    small, big = records[("matmul", True)], records[("matmul", False)]
    _check_schema(small)
    _check_schema(big)
    assert small["status"] == "ok" and small["mma_instructions"] > 0 and small["shared_bytes"] <= small["smem_limit"]
    assert big["status"] == "error" and "shared memory" in big["error"]
    assert big["shared_bytes"] > kernel_compile.SMEM_LIMIT[80]
    assert cfgs.rejection(big) is not None and cfgs.rejection(small) is None
    # only default configs fail CI
    assert not any(line.startswith("matmul") for line in kernel_sweep.failures(records.values()))


@needs_ptxas
def test_worker_crash_is_an_error_record(records):
    rec = records[("crash", True)]
    _check_schema(rec)
    assert rec["status"] == "error" and "exited with code 3" in rec["error"]


@needs_ptxas
def test_cache_hit_without_saved_log_asks_ptxas_again(records, cache_dir, monkeypatch):
    logs = list(cache_dir.rglob("*.ptxas.log"))
    assert logs  # saved beside the cubins by the first sweep
    for f in logs:
        f.unlink()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    [rec] = kernel_sweep.run(kernel_sweep.plan(_cases()[:1], [80]), workers=1, registry=CASES,
                             extra_paths=[str(TESTS)])
    first = records[("copy", True)]
    assert rec["status"] == "ok" and (rec["registers"], rec["spills"]) == (first["registers"], first["spills"])
    assert list(cache_dir.rglob("*.ptxas.log"))


@needs_ptxas
def test_json_and_markdown_outputs(records, tmp_path):
    doc = dict(sweep="ci", targets=["sm_80"], versions={"triton": triton.__version__}, records=list(records.values()))
    md = kernels_cli.markdown(json.loads(json.dumps(doc)))
    summary_part, records_part = md.split("## Every default-config record")
    assert records_part.count("\n| ") == 1 + 4  # header + one row per default record
    assert "| copy | sm_80 | fp16 | 128 w4 s3 | ok |" in records_part
    assert "| broken | sm_80 | fp16 | 16 w4 s3 | error |" in records_part
    assert "| copy | sm_80 | 128 w4 s3 | 1/1 | " in summary_part
    assert "| broken | sm_80 | 16 w4 s3 | 0/1 |" in summary_part
    assert "Autotune candidates compiled: 1; rejected by the compile rule" in summary_part
    src, dst = tmp_path / "run.json", tmp_path / "run.md"
    src.write_text(json.dumps(doc))
    assert main(["kernels", "--from-json", str(src), "--markdown", str(dst)]) == 0
    rendered = dst.read_text()
    assert str(src) in rendered.splitlines()[0] and rendered.split("\n", 1)[1] == md.split("\n", 1)[1]
    text = kernels_cli.summary(list(records.values()))
    assert "copy" in text and "1/1" in text and "0/1" in text


def _cfg(bm, bn, w=4, s=2):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def test_rejection_rule():
    ok = dict(status="ok", spills=0, shared_bytes=1000, smem_limit=166912)
    assert cfgs.rejection(ok) is None
    assert "spills 8" in cfgs.rejection({**ok, "spills": 8})
    assert "over the limit" in cfgs.rejection({**ok, "shared_bytes": 200000})
    assert cfgs.rejection(dict(status="error", error="ptxas failed")) == "ptxas failed"


def test_prune_by_compile_drops_rejected_configs_and_caches():
    calls = []

    def fake_compile(fn, values, *, arch, num_warps, num_stages):
        calls.append((values["BLOCK_M"], arch))
        bm = values["BLOCK_M"]
        if bm == 128:
            return dict(status="ok", spills=16, shared_bytes=0, smem_limit=1)
        if bm == 64:
            return dict(status="error", error="shared memory 300000 B exceeds the sm_90 limit")
        return dict(status="ok", spills=0, shared_bytes=1024, smem_limit=232448)

    args = {"Q": __import__("torch").empty(1, dtype=__import__("torch").bfloat16),
            **{k: 1 for k in ("BLOCK_D", "HEAD_DIM", "GROUP")}, "CAUSAL": True, "HAS_SOFTCAP": False,
            "HAS_WINDOW": True, "DOT_F32": False, "INPUT_PRECISION": "tf32"}
    configs = [_cfg(128, 64), _cfg(64, 64), _cfg(32, 32)]
    kept = cfgs.prune_by_compile("test-fwd", None, configs, args, 90, fake_compile)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32]
    n = len(calls)
    cfgs.prune_by_compile("test-fwd", None, configs, args, 90, fake_compile)
    assert len(calls) == n  # cached per (kernel, arch, config, specialisation)
    with pytest.raises(RuntimeError, match="no tile config compiles for sm_90"):
        cfgs.prune_by_compile("test-fwd", None, configs[:2], {**args, "GROUP": 2}, 90, fake_compile)


def test_registry_covers_every_axis_value_and_default():
    for name, short in (("segment_attention.fwd", "fwd"), ("segment_attention.bwd_dq", "dq"),
                        ("segment_attention.bwd_dkdv", "dkdv")):
        k = kernel_specs.by_name(name)
        specs = k.specialisations("ci")
        for axis, values in (("dtype", kernel_specs.DTYPES), ("head_dim", kernel_specs.HEAD_DIMS),
                             ("causal", (True, False)), ("softcap", (True, False)), ("window", (True, False))):
            assert {s[axis] for s in specs} == set(values), (name, axis)
        full = k.specialisations("full")
        assert len(full) == 3 * 5 * 2 * 2 * 2 * len(kernel_specs.GROUPS)
        # every distinct default config of the full product is compiled by the CI sweep
        assert _defaults(k, full) == _defaults(k, specs)
        # the autotune candidates are the configs module's own list
        assert {c.label() for c in k.configs(specs[0])} >= {
            kernel_specs.LaunchConfig({"BLOCK_M": m, "BLOCK_N": n}, w, s).label()
            for m, n, w, s in cfgs.candidate_tuples(short)}


def _defaults(kernel, specs):
    return {c.label() for s in specs for c in kernel.configs(s) if c.default}


def test_every_registry_kernel_gets_all_its_arguments():
    for k in kernel_specs.KERNELS:
        for sweep in ("ci",):
            for spec in k.specialisations(sweep):
                values = kernel_specs.launch_values(k, spec, k.configs(spec)[0])
                assert set(values) == set(k.fn().arg_names), k.name


def test_plan_defaults_only_unless_all_configs():
    ks = kernel_specs.KERNELS
    base = kernel_sweep.plan(ks, [80, 90])
    assert all(t["default"] for t in base) and {t["arch"] for t in base} == {80, 90}
    assert {t["kernel"] for t in base} == {k.name for k in ks}
    more = kernel_sweep.plan(ks, [90], all_configs=True, only=["bwd_dq"])
    assert {t["kernel"] for t in more} == {"segment_attention.bwd_dq"} and not all(t["default"] for t in more)


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 440 bytes cmem[0]
"""


def test_parse_ptxas_logs():
    recs = cuda_resources.parse_ptxas_v(PTXAS_LOG)
    assert [(r["kernel"], r["target"], r["registers"], r["spills"], r["shared_bytes"]) for r in recs] == [
        ("_Z3fooPf", "sm_90", 64, 8, 2048), ("_Z3barv", "sm_80", 32, 0, 0)]
    assert kernel_sweep.failures(recs) == ["_Z3fooPf sm_90  []: spills 8 B (4 B stores, 4 B loads)"]
    triton_spill = {**recs[1], "family": "triton", "kernel": "t", "spills": 4, "spill_stores": 2, "spill_loads": 2}
    assert len(kernel_sweep.failures([*recs, triton_spill])) == 2
    assert kernel_sweep.failures([*recs, triton_spill], triton_spills=False) == kernel_sweep.failures(recs)
    assert kernel_compile.parse_ptxas(PTXAS_LOG.split("'sm_80'")[0]) == dict(
        registers=64, spill_stores=4, spill_loads=4, stack_bytes=8)
    with pytest.raises(ValueError, match="registers"):
        kernel_compile.parse_ptxas("ptxas info: nothing")


def test_compile_refuses_interpreted_kernel():
    k = kernel_specs.by_name("decode.merge_states")
    spec = k.specialisations("ci")[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_compile.compile_launch(k.fn(), kernel_specs.launch_values(k, spec, k.configs(spec)[0]),
                                      arch=80, num_warps=4, num_stages=3)


def test_cli_lists_kernels_and_rejects_bad_targets(capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    for k in kernel_specs.KERNELS:
        assert k.name in out
    assert "128x32 w8 s3 (default)" in out
    assert main(["kernels", "--compile", "--targets", "eighty"]) == 2
    assert "--targets" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_report_of_a_tiny_source(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { __shared__ float s[64]; s[threadIdx.x] = x[threadIdx.x];"
                   " __syncthreads(); x[threadIdx.x] = s[63 - threadIdx.x]; }\n")
    recs, note = cuda_resources.collect(cuda_resources.start([80], [src]))
    assert note is None
    got = [(r["kernel"], r["target"], r["spills"], r["shared_bytes"]) for r in recs]
    assert got == [("k(float*)", "sm_80", 0, 256)]


def test_cuda_report_finds_the_repository_csrc():
    # the report must read csrc/*.cu, not silently report "no CUDA sources" after a move
    assert (cuda_resources.CSRC / "decode.cu").is_file(), cuda_resources.CSRC
