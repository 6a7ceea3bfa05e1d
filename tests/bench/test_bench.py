"""The benchmark harness: smoke run JSON schema, FLOP counting, peers' correctness, plots.

No timing assertions: timings on shared CI machines mean nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cacheaug_engine.bench import cli, flops, peers, plot, records

from cacheaug_engine.ops.reference import segment_attention as ref_segment
from cacheaug_engine.ops.reference import segment_visibility


@pytest.fixture(scope="module")
def smoke_doc(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    rc = cli.main(["all", "--smoke", "--out", str(out), "--no-progress"])
    assert rc == 0
    return json.loads(out.read_text())


def test_smoke_json_schema(smoke_doc):
    assert records.validate_results(smoke_doc) == []
    assert smoke_doc["smoke"] is True and smoke_doc["sections"] == ["ops", "train", "decode"]
    for key in ("torch", "triton", "python", "cuda"):
        assert key in smoke_doc["versions"]
    assert smoke_doc["peaks"]["matmul_tflops"] and smoke_doc["peaks"]["copy_gbps"]
    ops = {r["op"] for r in smoke_doc["records"]}
    assert {"segment_attention.fwd", "segment_attention.fwdbwd", "decode_attention", "cascade_decode",
            "merge_states", "train_step", "decode_e2e"} <= ops
    for r in smoke_doc["records"]:
        assert r["status"] == "ok" or r["status"].split(":")[0] in ("unavailable", "skipped"), r
        assert isinstance(r["shape"], dict) and isinstance(r["speedup_vs"], dict)
    # a crash is never a result: no "error:" (or "oom:") record, whatever the backend or peer
    crashed = [(r["op"], r["backend"], r["status"]) for r in smoke_doc["records"] if r["status"] != "ok"
               and r["status"].split(":")[0] not in ("unavailable", "skipped")]  # fmt: skip
    assert not crashed, crashed
    ours = [r for r in smoke_doc["records"] if r["backend"] in ("triton", "flex", "cuda")]
    assert {r["backend"] for r in ours} == {"triton", "flex", "cuda"}
    if not torch.cuda.is_available():
        # the interpreter runs every triton case; cuda says it needs CUDA tensors, never "no device" as a pass
        assert all(r["status"] == "ok" for r in ours if r["backend"] == "triton")
        assert all(r["status"].startswith("unavailable: ") and "cuda" in r["status"].lower()
                   for r in ours if r["backend"] == "cuda")  # fmt: skip
        assert all(r["status"] == "ok" for r in ours if r["backend"] == "flex" and r["op"] == "segment_attention.fwd")
    ok = {(r["op"], r["backend"]) for r in smoke_doc["records"] if r["status"] == "ok"}
    # the torch backend and the plain-PyTorch peers run everywhere
    assert ("segment_attention.fwd", "torch") in ok and ("segment_attention.fwd", "peer:sdpa_dense") in ok
    assert ("segment_attention.fwdbwd", "torch") in ok and ("decode_attention", "torch") in ok
    seg = [r for r in smoke_doc["records"] if r["op"] == "segment_attention.fwd" and r["backend"] == "torch"]
    assert all(r["tflops"] > 0 and r["pct_peak"] > 0 and "peer:naive_loop" in r["speedup_vs"] for r in seg)
    dec = [r for r in smoke_doc["records"] if r["op"] == "decode_attention" and r["status"] == "ok"]
    assert all(r["gbps"] > 0 for r in dec)
    # peers that cannot run here say why
    fa = [r for r in smoke_doc["records"] if r["backend"] == "peer:flash_attn"]
    if not torch.cuda.is_available():
        assert fa and all(r["status"].startswith("unavailable: ") for r in fa)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 7, 40])
def test_visible_pairs_match_bruteforce(causal, window):
    s = 5
    lens = torch.tensor([[0, 1, 4, 9, 23], [2, 2, 30, 31, 31]], dtype=torch.int32)
    brute = sum(int(segment_visibility(int(p), s, causal=causal, window=window).sum())
                for p in lens.flatten())
    assert flops.visible_pairs(lens, s, causal, window) == brute
    f = flops.segment_flops(lens, s, hq=3, dh=8, causal=causal, window=window)
    assert f == 4 * 8 * 3 * brute
    fb = flops.segment_flops(lens, s, 3, 8, causal=causal, window=window, backward=True)
    assert fb == pytest.approx(3.5 * f)


def test_decode_bytes_and_flops():
    lens = torch.tensor([10, 20])
    assert flops.decode_bytes(lens, hq=4, hkv=2, dh=8, elt=2) == 2 * 8 * (2 * 2 * 30 + 2 * 2 * 4)
    assert flops.decode_flops(lens, hq=4, dh=8, window=15) == 4 * 8 * 4 * (10 + 15)


@pytest.mark.parametrize("softcap,window", [(None, None), (None, 6), (5.0, None)])
def test_segment_peers_match_reference(softcap, window):
    from cacheaug_engine.bench import ops_segment
    from cacheaug_engine.bench.shapes import SegmentShape

    shape = SegmentShape("t", 4, 2, 16, t=20, n=3, n_l=2, n_a=3, softcap=softcap, window=window, b=2)
    x = ops_segment._inputs(shape, torch.device("cpu"), torch.float32, grad=False)
    want = ref_segment(x["q"], x["k"], x["v"], x["kp"], x["vp"], x["lens"], block_len=shape.s,
                       softcap=softcap, window=window)
    got = ops_segment._peer("naive_loop", shape, x, False)()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    mask = peers.dense_segment_mask(x["lens"], shape.t, shape.s, True, window)
    kc = torch.cat([x["kp"], x["k"]], 2)
    vc = torch.cat([x["vp"], x["v"]], 2)
    got = peers.eager_attention(x["q"], kc, vc, mask, 1 / math.sqrt(16), softcap)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_measure_records_failures_instead_of_raising():
    ctx = records.BenchContext(torch.device("cpu"), smoke=True, progress=False, peaks={"copy_gbps": 1.0})

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    def unavailable():
        raise records.Unavailable("flash-attn is not installed")

    a = ctx.measure("op", "x", {"t": 1}, torch.float32, oom)
    b = ctx.measure("op", "peer:y", {"t": 1}, torch.float32, unavailable)
    c = ctx.measure("op", "z", {"t": 1}, torch.float32,
                    lambda: ((lambda: None), None, records.Work(bytes=1e6, memory_bound=True)))
    assert a.status.startswith("oom: ") and b.status == "unavailable: flash-attn is not installed"
    assert c.status == "ok" and c.gbps > 0 and c.pct_peak is not None
    ctx.time_budget_s = -1.0
    d = ctx.measure("op", "w", {"t": 1}, torch.float32, oom)
    assert d.status.startswith("skipped")


def test_fill_speedups_only_for_ours_in_same_group():
    mk = lambda b, ms, g="g": records.Record("op", b, {}, "bf16", ms=ms, group=g)  # noqa: E731
    recs = [mk("triton", 1.0), mk("peer:sdpa", 3.0), mk("torch", 2.0), mk("peer:other", 5.0, g="h")]
    records.fill_speedups(recs)
    assert recs[0].speedup_vs == {"peer:sdpa": 3.0, "torch": 2.0}
    assert recs[1].speedup_vs == {} and "peer:other" not in recs[2].speedup_vs


def _rec(op: str, backend: str, shape: dict, ms: float, **kw) -> dict:
    base = {"op": op, "backend": backend, "shape": shape, "dtype": "bfloat16", "ms": ms, "tflops": None,
            "gbps": None, "pct_peak": None, "speedup_vs": {}, "peak_mem_mb": None, "status": "ok"}
    return {**base, **kw}


def _synthetic_doc() -> dict:
    recs = []
    for t, ours, sdpa, flex in ((1024, 1.0, 2.0, 1.5), (4096, 2.0, 6.0, 2.5), (16384, 5.0, 30.0, 6.0)):
        shape = {"model": "llama3-8b", "t": t, "n": 64, "n_l": 16, "s": 31}
        for backend, ms in (("triton", ours), ("peer:sdpa_dense", sdpa), ("peer:flex_compiled", flex)):
            recs.append(_rec("segment_attention.fwd", backend, shape, ms, tflops=100.0 / ms,
                             pct_peak=10.0 / ms, peak_mem_mb=100.0))
    recs.append(_rec("train_step", "default", {"model": "x", "B": 1, "T": 8}, 3.0, peak_mem_mb=1.0,
                     extra={"tokens_per_s": 2666.7}))
    versions = {"torch": "x", "triton": "y", "python": "z", "cuda": "w"}
    return {"device": "SyntheticGPU 80GB", "versions": versions,
            "commit": "abc", "date": "2026-01-01T00:00:00+00:00", "peaks": {"matmul_tflops": 800.0},
            "records": recs}


def test_plot_renders_png_and_markdown(tmp_path):
    src = tmp_path / "synthetic.json"
    src.write_text(json.dumps(_synthetic_doc()))
    written = plot.render([src], tmp_path / "plots", tmp_path / "table.md")
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "table.md").read_text()
    assert "SyntheticGPU 80GB" in md and "vs sdpa_dense" in md and "6.00x" in md  # 30 / 5 at T = 16k
    assert "train_step" in md
    sp = plot.speedups(_synthetic_doc()["records"])
    assert sorted(round(v["flex_compiled"], 2) for v in sp.values()) == [1.2, 1.25, 1.5]


def test_cli_plot_subcommand(tmp_path):
    src = tmp_path / "synthetic.json"
    src.write_text(json.dumps(_synthetic_doc()))
    argv = ["plot", str(src), "--out", str(tmp_path / "t.md"), "--plot-dir", str(tmp_path / "p")]
    assert cli.main(argv) == 0
    assert (tmp_path / "t.md").exists() and list((tmp_path / "p").glob("*.png"))


def test_cpu_peer_smoke_writes_paired_ratios(tmp_path):
    """`cacheaug bench cpu --smoke`: ours vs transformers, same weights (the losses agree or it raises)."""
    pytest.importorskip("transformers")
    from cacheaug_engine.bench.cpu_peer import run_cpu_peer

    doc = run_cpu_peer(str(tmp_path / "cpu.json"), smoke=True, repeats=1, warmup=0)
    assert [c["case"] for c in doc["cases"]] == ["prefill", "prefill", "train_step", "generate", "generate"]
    assert all(len(c["ratios"]) == 1 and c["ratio_median"] > 0 for c in doc["cases"])
    assert all(c["ratio_torch_linear_median"] > 0 and len(c["ratio_ci95"]) == 2 for c in doc["cases"])
    assert doc["ours_linear"].startswith(("onednn", "torch"))
    assert (tmp_path / "cpu.json").is_file()


def test_median_interval_order_statistics():
    from cacheaug_engine.bench.cpu_peer import median_interval

    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # n <= 5: min and max
    xs = [float(i) for i in range(1, 16)]  # n = 15: ranks 4 and 12 (coverage 96.5%)
    assert median_interval(xs) == (4.0, 12.0)
    assert median_interval([float(i) for i in range(1, 8)]) == (1.0, 7.0)
