"""`cacheaug bench serve`: augmented and plain requests through vLLM against our own ``generate``.

For each batch size B (default 1, 8, 32) one batch of B distinct prompts, greedy, ``--max-new-tokens``
tokens each (``ignore_eos``: every request produces exactly that many), timed as a whole:

* ``vllm/plain``: ``LLM.generate`` of the texts (the engine alone);
* ``vllm/augmented``: :class:`~cacheaug_engine.integrations.vllm.AugmentedLLM` with a cold latent
  cache: the coprocessor runs (one batched pass per 32 prompts) before the engine decodes; its
  seconds and share of the wall time are recorded;
* ``vllm/augmented-cached``: the same prompts again, latents from the cache (the paper's offline
  mode: what serving costs once latents are precomputed);
* ``ours/plain`` and ``ours/augmented``: ``generation.generate`` on our decoder (coprocessor inside).

Threads: vLLM's CPU worker runs torch on one thread ("Reducing Torch threads ... for serving") unless
OMP_NUM_THREADS is set; ``threads`` sets ours (on a 2-core machine shared with other jobs, 2 OpenMP
threads made our batch-1 decode ~10x slower than 1: spinning threads fight the other load).

Each case: one untimed warm-up, then ``--repeats`` timed runs (median). Requests/s = B / wall,
tokens/s = B * new tokens / wall. Works on a GPU as is (``--device cuda``: vLLM's CUDA build, our
decoder on CUDA, bf16 by default there). Needs vLLM: run it from vLLM's own virtual environment.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .timing import device_name, git_commit

PROMPTS = (
    "The capital of France is", "12 + 30 =", "Once upon a time", "The best way to learn a language is",
    "def fibonacci(n):", "Water boils at", "The three primary colors are", "In 1969, the first person to",
)


def batch_prompts(b: int, round_: int = 0) -> list[str]:
    """``b`` distinct prompts (a numbered variant of the base prompts; ``round_`` makes a fresh set)."""
    return [f"{PROMPTS[i % len(PROMPTS)]} (case {round_}.{i})" for i in range(b)]


def _row(engine: str, mode: str, b: int, new: int, walls: list[float], cop: list[float] | None = None) -> dict:
    wall = statistics.median(walls)
    row: dict[str, Any] = {"engine": engine, "mode": mode, "batch": b, "new_tokens": new,
                           "wall_s": round(wall, 4), "walls_s": [round(w, 4) for w in walls],
                           "requests_per_s": round(b / wall, 3), "tokens_per_s": round(b * new / wall, 2)}
    if cop is not None:
        c = statistics.median(cop)
        row.update(coprocessor_s=round(c, 4), coprocessor_share=round(c / wall, 4))
    return row


def run_serve_bench(model_dir: str, coprocessor: str, out: str, *, batches: tuple[int, ...] = (1, 8, 32),
                    max_new_tokens: int = 16, repeats: int = 2, device: str = "cpu", dtype: str | None = None,
                    max_model_len: int = 256, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run the cases and write the JSON document to ``out`` (rewritten after every case); returns it."""
    import json
    import os

    from tqdm import tqdm

    from cacheaug_engine.generation import generate
    from cacheaug_engine.integrations.vllm import AugmentedLLM, require_vllm

    vllm = require_vllm()
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cpu":  # else vLLM's CPU backend reserves 92 % of the machine's memory and may refuse to start
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    t0 = time.perf_counter()
    llm = AugmentedLLM(model_dir, coprocessor=coprocessor, dtype=dtype, enforce_eager=device != "cuda",
                       max_model_len=max_model_len, seed=0, max_num_seqs=max(batches))
    start_s = time.perf_counter() - t0
    aug = llm.augmenter
    dec = aug.decoder.to(device=device, dtype=tdt)
    cop = aug.coprocessor.to(device=device, dtype=tdt)
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    doc: dict[str, Any] = {
        "kind": "serve", "device": device_name(torch.device(device)),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "vllm": vllm.__version__,
        "commit": git_commit(), "model": str(model_dir), "coprocessor": str(coprocessor), "dtype": dtype,
        "placement": aug.placement, "num_latents": aug.num_latents, "engine_start_s": round(start_s, 2),
        "config": {"batches": list(batches), "max_new_tokens": max_new_tokens, "repeats": repeats,
                   "max_model_len": max_model_len, "enforce_eager": device != "cuda"},
        "rows": [],
    }

    def write() -> None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")

    cases = [(b, c) for b in batches for c in ("vllm/plain", "vllm/augmented", "vllm/augmented-cached",
                                                "ours/plain", "ours/augmented")]
    round_ = 0
    try:
        for b, case in tqdm(cases, desc="bench serve", disable=not progress):
            engine, mode = case.split("/")
            walls, cops = [], []
            for rep in range(repeats + 1):  # rep 0: warm-up
                round_ += 1
                prompts = batch_prompts(b, round_)  # fresh prompts: a cold latent cache unless "cached"
                if mode == "augmented-cached":
                    llm.build_inputs(prompts, True)  # latents computed before the clock starts
                s0 = aug.stats.seconds
                t = time.perf_counter()
                if engine == "vllm":
                    outs = llm.generate(prompts, sp, augment=mode != "plain")
                    n = sum(len(o.outputs[0].token_ids) for o in outs)
                else:
                    rows = [llm.encode(p) for p in prompts]
                    g = generate(dec, rows, coprocessor=cop if mode == "augmented" else None,
                                 augmented=mode == "augmented", max_new_tokens=max_new_tokens)
                    n = sum(len(x) for x in g.tokens)
                if device == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t
                if n != b * max_new_tokens:
                    raise RuntimeError(f"{case} B={b}: {n} tokens, expected {b * max_new_tokens}")
                if rep:
                    walls.append(wall)
                    cops.append(aug.stats.seconds - s0)
            doc["rows"].append(_row(engine, mode, b, max_new_tokens, walls,
                                    cops if engine == "vllm" and mode == "augmented" else None))
            write()
    finally:
        llm.close()
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    write()
    return doc


def table(doc: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    lines = ["| engine | mode | batch | wall s | requests/s | tokens/s | coprocessor s (share) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        cop = f"{r['coprocessor_s']} ({100 * r['coprocessor_share']:.0f} %)" if "coprocessor_s" in r else ""
        lines.append(f"| {r['engine']} | {r['mode']} | {r['batch']} | {r['wall_s']} | {r['requests_per_s']} | "
                     f"{r['tokens_per_s']} | {cop} |")
    return "\n".join(lines)
