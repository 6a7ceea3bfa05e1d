"""Two checkpoints' held-out perplexity, paired: B against A on the same sequences and targets.

``cacheaug eval`` reports each checkpoint against the decoder and the controls; when two checkpoints differ
in one setting (e.g. ``--first-weight 4`` against 1, or ``--no-shift-tokens`` against shifted, from the
same start and seed), this gives B's paired perplexity change against A per position and over 1-K, with a
95% normal interval over held-out sequences (the unit), from the per-sequence CEs both eval.json files hold.

    python tools/paired_eval.py runs/evalA/eval.json:0 runs/evalB/eval.json:1 --method coprocessor

``FILE:I`` picks result I of a file (several checkpoints in one ``cacheaug eval``); default 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch


def _load(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    path, _, idx = spec.partition(":")
    whole = json.loads(open(path, encoding="utf-8").read())
    return whole, whole["results"][int(idx or 0)]


def paired(a: dict[str, Any], b: dict[str, Any], method: str, mean_upto: int = 8) -> dict[str, Any]:
    """B's ``method`` CE against A's, per position and over 1-K: {"positions", "change_pct": [(m, lo, hi)]}."""
    from cacheaug_engine.eval.tables import paired_interval

    ca = torch.tensor(a["per_sequence_ce"][method], dtype=torch.float64)
    cb = torch.tensor(b["per_sequence_ce"][method], dtype=torch.float64)
    if ca.shape != cb.shape:
        raise ValueError(f"the two evaluations scored different targets: {tuple(ca.shape)} vs {tuple(cb.shape)}")
    k = min(mean_upto, ca.shape[1])
    cols = [(str(i + 1), cb[:, i], ca[:, i]) for i in range(ca.shape[1])]
    cols.append((f"mean 1-{k}", cb[:, :k].mean(1), ca[:, :k].mean(1)))
    out = []
    for name, x, y in cols:
        m, lo, hi = paired_interval(x, y)
        out.append({"position": name, "change_pct": [100 * math.expm1(v) for v in (m, lo, hi)]})
    return {"method": method, "num_sequences": int(ca.shape[0]), "rows": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="the reference: eval.json[:I]")
    ap.add_argument("b", help="the one compared: eval.json[:I]")
    ap.add_argument("--method", default="coprocessor", help="decoder, coprocessor, pause, shuffled or mean")
    args = ap.parse_args(argv)
    wa, a = _load(args.a)
    wb, b = _load(args.b)
    if wa.get("heldout_sequences") != wb.get("heldout_sequences") or wa.get("seq_len") != wb.get("seq_len"):
        raise SystemExit("the two evaluations used different held-out sets (heldout_sequences / seq_len differ)")
    res = paired(a, b, args.method)
    print(f"{args.method}: {b['label']} against {a['label']}, {res['num_sequences']} held-out sequences")
    for r in res["rows"]:
        m, lo, hi = r["change_pct"]
        print(f"  position {r['position']:>8}: {m:+.2f}% [{lo:+.2f}, {hi:+.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
