"""Where does position 1 lose? (issue 24, item 5): the first target after an augmentation point.

Every latent method trained on text so far costs 11-17% of perplexity at position 1 against the
decoder alone. This probe takes a trained coprocessor (default: the shipped text one) and scores the
same held-out targets as ``cacheaug eval`` under interventions that each change one thing:

* ``gap only``: no latents at all, but the token rows keep the positions they have behind N_L latents
  (a RoPE gap of N_L); ``gap 0`` is the decoder alone recomputed by the block pass (a check);
* ``latents x a``: the coprocessor's latents scaled by a (0 = zero vectors in the latent rows);
* ``last k latents``: only the last k of the N_L latents (fewer rows between prefix and targets);
* ``paper placement``: the same latents (read from x[:p-1]) put after x[p-1] instead of before it;
* ``no shift``: the same latents, but the token rows keep their own positions (the latents take the
  N_L positions before them, which the prefix's last tokens also have), so no RoPE gap opens;
* ``pause``: the pause table trained on the same budget.

Then the training histories (``state.json`` / ``stages.json``: the position-1 CE of each training
batch against the decoder's on the same targets) give the cost against training length.

    python tools/position1_probe.py --out docs/position1-probe            # the shipped text pair
    python tools/position1_probe.py --coprocessor runs/X/checkpoint --pause runs/Y/checkpoint --out ...

Writes OUT.json (every figure and the per-sequence CEs), OUT.md (the tables) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SCALES = (0.0, 0.5, 0.75, 1.25)


def _pct(x: float) -> float:
    return 100.0 * math.expm1(x)


def tokens_only_ce(decoder: Any, ids: Tensor, cache: Any, lay: Any, gap: int) -> Tensor:
    """CE [B, N, N_A] of ``lay``'s targets from its token rows alone (no latent rows), the rows at the
    positions they would have after ``gap`` latents. "early" layouts only: their token rows predict
    every target (a "paper" block's first target is predicted by a latent row)."""
    if lay.placement != "early":
        raise ValueError(f"tokens_only_ce needs an 'early' layout, got {lay.placement!r}")
    b, n = lay.positions.shape
    n_tok = lay.token_idx.shape[-1]
    tok = torch.gather(ids, 1, lay.token_idx.reshape(b, -1))
    x = decoder.embed(tok)
    pos = (lay.prefix_lens.unsqueeze(-1) + gap + torch.arange(n_tok, device=ids.device)).reshape(b, -1)
    hidden = decoder.forward_blocks(x, pos, cache, lay.prefix_lens, n_tok, output="hidden")
    h = hidden.view(b, n, n_tok, -1)[:, :, n_tok - lay.ahead :]
    targets = torch.gather(ids, 1, lay.target_idx.reshape(b, -1)).view(b, n, -1)
    return F.cross_entropy(decoder.logits(h).float().flatten(0, 2), targets.reshape(-1), reduction="none").view(
        b, n, -1
    )


def no_shift(lay: Any) -> Any:
    """``lay`` with ``shift_tokens=False``: the token rows sit at their own positions (as in the decoder
    alone) and the latents at the N_L positions before the first of them (``cacheaug train
    --no-shift-tokens`` trains for this layout)."""
    from cacheaug_engine.augment.layout import block_layout

    return block_layout(lay.positions, lay.num_latents, lay.ahead, lay.placement, shift_tokens=False)


@torch.no_grad()
def probe(objective: Any, sequences: Tensor, *, pause: Any = None, batch_size: int = 4,
          scales: tuple[float, ...] = SCALES, progress: Any = None) -> dict[str, Any]:
    """Per-sequence mean CE per position {variant: [n][N_A]} of every intervention on ``sequences``."""
    from cacheaug_engine.augment.layout import block_layout, layout_for
    from cacheaug_engine.eval.evaluator import point_batches

    cop, dec, na = objective.coprocessor, objective.decoder, objective.ahead
    nl = cop.num_latents
    if cop.placement != "early" or not cop.shift_tokens:
        raise ValueError("the probe's gap, placement and no-shift variants need an 'early' coprocessor trained with "
                         f"shifted positions, got placement {cop.placement!r}, shift_tokens {cop.shift_tokens}")
    objective.eval()
    rows: dict[str, list[Tensor]] = {}
    dev = next(iter(cop.parameters())).device
    for ids, pos in point_batches(sequences, ahead=na, stride=na, batch_size=batch_size, min_rows=1, device=dev):
        lay = objective.layout(pos)
        cache, ce_dec = objective.prefill(ids, lay)
        z = cop(cache, lay)
        ces = {"decoder": ce_dec,
               "gap 0 (decoder by the block pass)": tokens_only_ce(dec, ids, cache, lay, 0),
               f"gap {nl} only (no latents)": tokens_only_ce(dec, ids, cache, lay, nl),
               "coprocessor": objective.score(ids, cache, lay, z)}
        for a in scales:
            ces[f"latents x{a:g}"] = objective.score(ids, cache, lay, z * a)
        k = nl // 2
        while k >= 1:
            lay_k = block_layout(pos, k, na, "early")
            ces[f"last {k} of {nl} latents"] = objective.score(ids, cache, lay_k, z[:, :, nl - k :])
            k //= 2
        if bool((lay.prefix_lens >= nl).all()):
            ces["no shift (tokens keep their positions)"] = objective.score(ids, cache, no_shift(lay), z)
        ces["paper placement (same latents)"] = objective.score(ids, cache, block_layout(pos, nl, na, "paper"), z)
        if pause is not None:
            lay_p = layout_for(pause, pos, na)
            ces["pause"] = objective.score(ids, cache, lay_p, pause(cache, lay_p))
        for name, ce in ces.items():
            rows.setdefault(name, []).append(ce.double().mean(1).cpu())
        if progress is not None:
            progress(ids.shape[0])
    return {name: torch.cat(v) for name, v in rows.items()}


def summarize(ce: dict[str, Tensor], mean_upto: int = 8) -> list[dict[str, Any]]:
    """Per variant: perplexity at position 1 and over 1-K, and the paired change against the decoder and
    against the coprocessor (%, 95% normal interval over sequences)."""
    from cacheaug_engine.eval.tables import paired_interval

    k = min(mean_upto, next(iter(ce.values())).shape[1])
    out = []
    for name, v in ce.items():
        row: dict[str, Any] = {"variant": name, "ppl_pos1": math.exp(float(v[:, 0].mean())),
                               f"ppl_mean_1_{k}": math.exp(float(v[:, :k].mean())),
                               "ppl_per_position": [math.exp(float(x)) for x in v.mean(0)]}
        for ref in ("decoder", "coprocessor"):
            for col, sl in (("pos1", slice(0, 1)), (f"mean_1_{k}", slice(0, k))):
                m, lo, hi = paired_interval(v[:, sl].mean(1), ce[ref][:, sl].mean(1))
                row[f"vs_{ref}_{col}"] = [_pct(m), _pct(lo), _pct(hi)]
        out.append(row)
    return out


def history_windows(ckpt_dir: Path, window: int = 50) -> list[dict[str, Any]]:
    """Position-1 training CE against the decoder's, per window of steps over every stage of a checkpoint
    (training batches, not held-out): [{"steps": "a-b", "pos1", "pos1_baseline", "change_pct"}]."""
    hist: list[dict[str, Any]] = []
    stages = ckpt_dir / "stages.json"
    if stages.is_file():
        for st in json.loads(stages.read_text()).values():
            hist += st["history"] if isinstance(st, dict) and "history" in st else st
    hist += json.loads((ckpt_dir / "state.json").read_text())["history"]
    out = []
    for i in range(0, len(hist), window):
        w = [h for h in hist[i : i + window] if "pos1" in h and "pos1_baseline" in h]
        if not w:
            continue
        p1 = sum(h["pos1"] for h in w) / len(w)
        b1 = sum(h["pos1_baseline"] for h in w) / len(w)
        out.append({"steps": f"{i + 1}-{i + len(w)}", "pos1": p1, "pos1_baseline": b1, "change_pct": _pct(p1 - b1)})
    return out


def _cell(t: list[float]) -> str:
    return f"{t[0]:+.1f}% [{t[1]:+.1f}, {t[2]:+.1f}]"


def markdown(res: dict[str, Any]) -> str:
    k = res["mean_upto"]
    lines = [f"Held-out: {res['num_sequences']} sequences, {res['points_per_sequence']} points each; "
             f"{res['coprocessor']}. Changes are paired perplexity changes with 95% intervals over sequences.", "",
             f"| variant | ppl pos 1 | vs decoder, pos 1 | vs decoder, mean 1-{k} | vs coprocessor, pos 1 | "
             f"vs coprocessor, mean 1-{k} |", "|---|---|---|---|---|---|"]
    for r in res["variants"]:
        lines.append(f"| {r['variant']} | {r['ppl_pos1']:.3f} | {_cell(r['vs_decoder_pos1'])} | "
                     f"{_cell(r[f'vs_decoder_mean_1_{k}'])} | {_cell(r['vs_coprocessor_pos1'])} | "
                     f"{_cell(r[f'vs_coprocessor_mean_1_{k}'])} |")
    for kind, hist in res["history"].items():
        lines += ["", f"Training batches of the {kind} (position-1 CE against the decoder's on the same targets):", "",
                  "| steps | pos-1 CE | decoder pos-1 CE | change |", "|---|---|---|---|"]
        lines += [f"| {h['steps']} | {h['pos1']:.3f} | {h['pos1_baseline']:.3f} | {h['change_pct']:+.1f}% |"
                  for h in hist]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.2, 1], "wspace": 0.75})
    dec = next(r for r in res["variants"] if r["variant"] == "decoder")["ppl_per_position"]
    shown = [r for r in res["variants"] if not (r["variant"].startswith("gap 0") or r["variant"] == "decoder")]
    for j, r in enumerate(shown):
        ch = [100 * (p / d - 1) for p, d in zip(r["ppl_per_position"], dec, strict=True)]
        a1.plot(range(1, len(ch) + 1), ch, marker="os^v"[j % 4], ms=3, color=plt.cm.tab20(j / max(len(shown), 1)),
                lw=2.2 if r["variant"] in ("coprocessor", "pause") else 1.2, label=r["variant"])
    a1.axhline(0, color="k", lw=0.8)
    a1.set_yscale("symlog", linthresh=20)  # the large position-1 costs and the few-% gains on one axis
    a1.set(xlabel="position after the augmentation point", ylabel="perplexity vs decoder alone (%)",
           title="held-out: interventions on the trained latents")
    a1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for kind, hist in res["history"].items():
        a2.plot(range(len(hist)), [h["change_pct"] for h in hist], marker="o", label=kind)
        a2.set_xticks(range(len(hist)), [h["steps"] for h in hist], rotation=45, fontsize=7)
    a2.axhline(0, color="k", lw=0.8)
    a2.set(xlabel="training steps", ylabel="position-1 perplexity vs decoder (%)", title="training batches")
    a2.legend()
    fig.savefig(png, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from cacheaug_engine.augment.objective import CacheAugmentationObjective
    from cacheaug_engine.augment.shipped import shipped_coprocessor, shipped_pause
    from cacheaug_engine.data.corpus import load_corpus
    from cacheaug_engine.data.text import load_tok
    from cacheaug_engine.models.loaders import load_model
    from cacheaug_engine.train.checkpoint import coprocessor_from_checkpoint, load_checkpoint, train_config_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coprocessor", default=None, help="checkpoint dir (default: the shipped text coprocessor)")
    ap.add_argument("--pause", default=None, help="pause-table checkpoint (default: the shipped one)")
    ap.add_argument("--eval-seqs", type=int, default=184)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True, help="OUT.json / OUT.md / OUT.png")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cop_dir = Path(a.coprocessor) if a.coprocessor else shipped_coprocessor()
    pause_dir = Path(a.pause) if a.pause else (shipped_pause() if a.coprocessor is None else None)
    if cop_dir is None:
        raise SystemExit("--coprocessor: no shipped coprocessor in this build; pass a checkpoint dir")
    ck = load_checkpoint(cop_dir, with_optimizer=False)
    pk = load_checkpoint(pause_dir, with_optimizer=False) if pause_dir else None
    cfg = train_config_of(ck)
    tok = load_tok(cfg.tokenizer, cfg.model)
    held = load_corpus(tok, cfg.seq_len, files=cfg.data or None, heldout_frac=cfg.heldout_frac).heldout[: a.eval_seqs]
    dec = load_model(cfg.model, torch.device("cpu"), impl=cfg.decoder_impl)
    cop = coprocessor_from_checkpoint(dec, ck, tokenizer=tok)
    pause = coprocessor_from_checkpoint(dec, pk, tokenizer=tok) if pk else None
    obj = CacheAugmentationObjective(dec, cop, ahead=cfg.ahead)
    t0 = time.perf_counter()
    with tqdm(total=held.shape[0], desc="probe", unit="seq") as bar:
        ce = probe(obj, held, pause=pause, batch_size=a.batch_size, progress=bar.update)
    npts = len(range(min(cfg.ahead, cfg.seq_len - cfg.ahead), cfg.seq_len - cfg.ahead + 1, cfg.ahead))
    history = {"coprocessor": history_windows(Path(ck.path))}
    if pk is not None:
        history["pause"] = history_windows(Path(pk.path))
    res = {"coprocessor": str(cop_dir), "pause": str(pause_dir) if pause_dir else None,
           "num_sequences": int(held.shape[0]), "points_per_sequence": npts, "mean_upto": min(8, cfg.ahead),
           "seconds": time.perf_counter() - t0, "variants": summarize(ce), "history": history,
           "per_sequence_ce": {k: v.tolist() for k, v in ce.items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    a.out.with_suffix(".md").write_text(markdown(res))
    plot(res, a.out.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {a.out.with_suffix('.json')}, .md, .png ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
