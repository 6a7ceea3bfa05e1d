"""Held-out task problems scored against the controls: the answer's per-token perplexity and greedy
exact match, with the cache augmented once after each problem's prompt (the paper's setting).

For each problem (``data.tasks.heldout_problems``: solved lines, then the question ``a+b=``) every
method augments the prompt's cache its own way (``generation.augmented_lm``): "decoder" (none),
"coprocessor", "pause" (a pause table), "shuffled" (the coprocessor's latents of the previous
problem: another problem's cache) and "mean" (the coprocessor's mean latent). Then

* the answer's tokens (the digits and the newline that ends the line) are scored teacher-forced:
  cross-entropy per answer position (1 = the first answer token), and per problem the mean over
  its answer tokens;
* the answer is decoded greedily up to the newline; exact match compares it with the gold answer.

Paired over the same problems, the coprocessor against each other method: the mean difference of
per-problem answer cross-entropy (a paired bootstrap; ``ppl_change_pct`` = exp(diff) - 1, so -10
means the coprocessor's answer perplexity is 10% lower) and the exact-match difference (the exact
paired test). A masked or missing method is never silently skipped: every method asked for runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from cacheaug_engine.data.text import decode, encode
from cacheaug_engine.eval.paired import clopper_pearson, exact_paired_binary, paired_bootstrap
from cacheaug_engine.generation.augmented_lm import NEEDS, AugmentedLM

# method name in reports -> AugmentedLM method
METHODS = {"decoder": "none", "coprocessor": "coprocessor", "shuffled": "shuffled", "mean": "mean", "pause": "pause"}


def encode_problems(tokenizer: Any, problems: Sequence[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, answer ids) per problem; the answer's ids are those of ``answer + "\\n"`` after the
    context in the tokenization of the whole line, so they are the tokens the decoder would read."""
    out = []
    for i, p in enumerate(problems):
        ctx = encode(tokenizer, p["context"])
        full = encode(tokenizer, p["context"] + p["answer"] + "\n")
        if not ctx or full[: len(ctx)] != ctx or len(full) <= len(ctx):
            raise ValueError(
                f"problems[{i}]: the tokenizer merges the context's last token with the answer "
                f"({p['context'][-12:]!r} + {p['answer']!r}); expected the context to tokenize as a prefix"
            )
        out.append((ctx, full[len(ctx):]))
    return out


def _answer_text(tokenizer: Any, ids: list[int]) -> str:
    return decode(tokenizer, ids).split("\n", 1)[0].strip()


@torch.no_grad()
def score_method(
    lm: AugmentedLM, tokenizer: Any, items: list[tuple[list[int], list[int]]], answers: Sequence[str], *,
    batch_size: int = 16, desc: str = "",
) -> dict[str, Any]:
    """Per problem: answer token cross-entropies (nats), the greedy answer (the decoded text up to the
    first newline, stripped) and its exact match, for one method."""
    lm.begin([c for c, _ in items])
    ce: list[list[float]] = []
    exact: list[int] = []
    said: list[str] = []
    for i in tqdm(range(0, len(items), batch_size), desc=desc or lm.method, unit="batch", leave=False):
        chunk = items[i : i + batch_size]
        rows = [c for c, _ in chunk]
        longest = max(len(a) for _, a in chunk)
        # one augmented prompt cache per problem serves both: scoring reads it, decoding then writes after it
        # (and the shuffled control's donor advances once per batch)
        pc = lm.prompt_caches(rows, room=longest + 2)
        lps = lm.token_logprobs(rows, [[a] for _, a in chunk], caches=pc)
        ce.extend([(-t[0][0]).tolist() for t in lps])
        gen = lm.generate(rows, max_new_tokens=longest + 2, caches=pc,
                          stop=lambda _b, toks: "\n" in decode(tokenizer, toks))
        for j, toks in enumerate(gen):
            said.append(_answer_text(tokenizer, toks))
            exact.append(int(said[-1] == answers[i + j]))
    return {"ce": ce, "exact": exact, "generated": said}


def _summarise(ce: list[list[float]], exact: list[int]) -> dict[str, Any]:
    width = max(len(r) for r in ce)
    by_pos = []
    for k in range(width):
        vals = [r[k] for r in ce if len(r) > k]
        by_pos.append(sum(vals) / len(vals))
    per_problem = [sum(r) / len(r) for r in ce]
    mean_ce = sum(per_problem) / len(per_problem)
    k = sum(exact)
    lo, hi = clopper_pearson(k, len(exact))
    return {
        "ce_by_position": by_pos,
        "ppl_by_position": [math.exp(v) for v in by_pos],
        "answer_ce": mean_ce,
        "answer_ppl": math.exp(mean_ce),
        "exact_match": k / len(exact),
        "exact_match_ci": [lo, hi],
        "exact_count": k,
    }


def evaluate_task(
    decoder: Any, tokenizer: Any, problems: Sequence[dict[str, str]], *, coprocessor: Any = None, pause: Any = None,
    methods: Sequence[str] | None = None, batch_size: int = 16, autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score ``problems`` under each method; returns per-method summaries, per-problem scores and the
    coprocessor's paired differences against every other method.

    ``methods`` defaults to every method the given modules allow (the decoder always; coprocessor,
    shuffled and mean with ``coprocessor``; pause with ``pause``). Asking for a method whose module is
    missing raises ValueError naming it."""
    if not problems:
        raise ValueError("problems: expected at least one problem")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    given = {"coprocessor": coprocessor, "pause": pause}
    if methods is None:  # every method whose checkpoint is given, in METHODS' order
        methods = [m for m, kind in METHODS.items() if NEEDS[kind] is None or given[NEEDS[kind]] is not None]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: expected names from {tuple(METHODS)}, got {m!r}")
        need = NEEDS[METHODS[m]]
        if need is not None and given[need] is None:
            raise ValueError(f"methods: {m!r} needs {'a pause table' if need == 'pause' else 'a coprocessor'}")
    if "shuffled" in methods and len(problems) < 2:
        raise ValueError("problems: the shuffled control needs >= 2 problems")
    items = encode_problems(tokenizer, problems)
    answers = [p["answer"] for p in problems]
    raw: dict[str, dict[str, Any]] = {}
    for m in methods:
        need = NEEDS[METHODS[m]]
        module = None if need is None else given[need]
        lm = AugmentedLM(decoder, METHODS[m], module, autocast_dtype=autocast_dtype)
        raw[m] = score_method(lm, tokenizer, items, answers, batch_size=batch_size, desc=m)
    out: dict[str, Any] = {
        "problems": len(problems),
        "answer_tokens": [len(a) for _, a in items],
        "methods": {m: _summarise(r["ce"], r["exact"]) for m, r in raw.items()},
        "per_problem": {m: {"answer_ce": [sum(c) / len(c) for c in r["ce"]], "ce": r["ce"], "exact": r["exact"],
                            "generated": r["generated"]} for m, r in raw.items()},
        "paired": {},
    }
    if "coprocessor" in raw:
        cop = out["per_problem"]["coprocessor"]
        for m in methods:
            if m == "coprocessor":
                continue
            other = out["per_problem"][m]
            d = paired_bootstrap(cop["answer_ce"], other["answer_ce"], seed=seed)
            out["paired"][f"coprocessor vs {m}"] = {
                "answer_ce": d,
                "ppl_change_pct": [100 * math.expm1(d[k]) for k in ("diff", "lo", "hi")],
                "exact_match": exact_paired_binary(cop["exact"], other["exact"]),
            }
    return out


def format_task_table(res: dict[str, Any], title: str = "") -> str:
    """A markdown table: per method the answer perplexity by position, overall, and exact match; then
    the coprocessor's paired differences."""
    ms = res["methods"]
    width = max(len(v["ppl_by_position"]) for v in ms.values())
    head = "| method | " + " | ".join(f"ppl@{k + 1}" for k in range(width)) + " | answer ppl | exact match [95%] |"
    lines = [f"### {title}" if title else "", head, "|" + "---|" * (width + 3)]
    for m, v in ms.items():
        cells = [f"{x:.3f}" for x in v["ppl_by_position"]] + [""] * (width - len(v["ppl_by_position"]))
        lo, hi = v["exact_match_ci"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {v['answer_ppl']:.3f} | "
                     f"{100 * v['exact_match']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |")
    if res["paired"]:
        lines += ["", "| coprocessor vs | answer ppl change [95%] | exact match diff [95%] | p (exact) |",
                  "|---|---|---|---|"]
        for name, d in res["paired"].items():
            c, e = d["ppl_change_pct"], d["exact_match"]
            lines.append(f"| {name.split(' vs ')[1]} | {c[0]:+.2f}% [{c[1]:+.2f}, {c[2]:+.2f}] | "
                         f"{100 * e['diff']:+.1f} [{100 * e['lo']:+.1f}, {100 * e['hi']:+.1f}] | {e['p_value']:.3g} |")
    return "\n".join(ln for ln in lines if ln is not None).strip() + "\n"
