"""GGUF -> HF model directory (config.json, model.safetensors, tokenizer files), checked against our decoder.

Serving engines (vLLM's CPU build among them) load HF directories, not GGUF files. transformers
reads a GGUF (``from_pretrained(dir, gguf_file=...)``, dequantizing it) but refuses to
``save_pretrained`` the result (it is marked as a quantized, non-serializable model); the weights
are therefore copied into a fresh model built from the same config (without its
``quantization_config``), which saves normally. The tokenizer transformers builds from the GGUF
metadata is saved beside it.

The parity check reloads the written directory with our own HF reader and compares it with our
GGUF decoder: every tensor equal (both dequantize the same payload), logits of a probe prompt
equal, and the written tokenizer's ids equal to ours on probe texts. Any difference raises.

transformers (5.x, the ``transformers`` extra) is needed; importing this module does not import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PROBE_TEXTS = (
    "The capital of France is",
    "def add(a, b):\n    return a + b  # 12 + 30 = 42",
    "Ünïcödé, emoji \U0001f600 and    spaces.",
)


@dataclass
class ExportReport:
    """What :func:`export_hf` wrote and what the parity check found.

    Attributes:
        out: the directory written.
        tensors: number of decoder tensors compared (every one equal, else the export raised).
        max_abs_diff: largest |difference| over all compared tensors (0.0 when equal).
        logits_max_abs_diff: largest |difference| of the probe prompt's logits, ours (GGUF) vs ours (HF dir).
        tokenizer_texts: probe texts whose ids matched between our GGUF tokenizer and the written one.
        files: the files written.
    """

    out: str
    tensors: int
    max_abs_diff: float
    logits_max_abs_diff: float
    tokenizer_texts: int
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "export-hf needs transformers (GGUF reader and HF writer): pip install 'cacheaug-engine[transformers]'"
        ) from None
    return transformers


def write_hf_dir(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write ``gguf`` as a HF directory at ``out`` (created; must be empty or absent); returns the file names."""
    transformers = _require_transformers()
    kw = {"gguf_file": gguf.name}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kw)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # what makes save_pretrained refuse: the copy is plain dense weights
    with torch.device("meta"):  # no random init of weights that are replaced right away
        fresh = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf}: weights did not map onto {type(fresh).__name__} "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    tok.save_pretrained(out)
    return sorted(p.name for p in out.iterdir())


@torch.no_grad()
def check_parity(gguf: Path, out: Path, probe_ids: list[int] | None = None) -> ExportReport:
    """Compare the HF directory ``out`` with our decoder and tokenizer read from ``gguf``; ValueError on any
    difference (naming the tensor, or the text and both id lists)."""
    from cacheaug_engine.models.gguf_loader import load_gguf_decoder
    from cacheaug_engine.models.hf import load_hf_decoder
    from cacheaug_engine.models.tokenizer import load_gguf_tokenizer, load_hf_tokenizer

    ref = load_gguf_decoder(gguf, torch.float32)
    got = load_hf_decoder(out, torch.float32)
    if ref.cfg.to_dict() != got.cfg.to_dict():
        diff = {k: (v, got.cfg.to_dict().get(k)) for k, v in ref.cfg.to_dict().items() if got.cfg.to_dict().get(k) != v}
        raise ValueError(f"{out}/config.json: decoder config differs from {gguf.name}'s: {diff}")
    ref_state, got_state = ref.state_dict(), got.state_dict()
    if set(ref_state) != set(got_state):
        only_gguf, only_hf = sorted(set(ref_state) - set(got_state)), sorted(set(got_state) - set(ref_state))
        raise ValueError(f"{out}: tensors differ from {gguf.name}'s: only in GGUF {only_gguf[:5]}, "
                         f"only in HF {only_hf[:5]}")
    worst = 0.0
    for name, t in ref_state.items():
        d = float((t.float() - got_state[name].float()).abs().max()) if t.numel() else 0.0
        worst = max(worst, d)
        if d != 0.0:
            raise ValueError(f"{out}: tensor {name} differs from {gguf.name}'s by up to {d:g}")
    ref_tok, got_tok = load_gguf_tokenizer(gguf), load_hf_tokenizer(out)
    for text in PROBE_TEXTS:
        a = ref_tok.encode(text, add_special_tokens=False).ids
        b = got_tok.encode(text, add_special_tokens=False).ids
        if a != b:
            raise ValueError(f"{out}/tokenizer.json: {text!r} -> {b}, but {gguf.name}'s tokenizer gives {a}")
    ids = probe_ids or ref_tok.encode(PROBE_TEXTS[0], add_special_tokens=False).ids
    x = torch.tensor([ids], dtype=torch.long)
    la, lb = ref.forward(x), got.forward(x)
    ldiff = float((la - lb).abs().max())
    if ldiff != 0.0:
        raise ValueError(f"{out}: logits of the probe prompt differ from {gguf.name}'s by up to {ldiff:g}")
    return ExportReport(str(out), len(ref_state), worst, ldiff, len(PROBE_TEXTS))


def export_hf(gguf: str | Path, out: str | Path, *, check: bool = True) -> ExportReport:
    """GGUF file -> HF directory ``out`` (fp32 weights, config, tokenizer), then the parity check.

    ``out`` must not exist or be empty (nothing is overwritten). Returns an :class:`ExportReport`
    (``report.json`` in ``out`` holds the same); raises ValueError when the check finds a difference.
    """
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{gguf}: not a GGUF file (its first bytes are not b'GGUF')")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory (export-hf writes a new directory)")
    _require_transformers()
    files = write_hf_dir(gguf, out)
    if not check:
        return ExportReport(str(out), 0, float("nan"), float("nan"), 0, files)
    report = check_parity(gguf, out)
    report.files = files
    (out / "export_report.json").write_text(json.dumps({**report.to_dict(), "source": str(gguf)}, indent=1) + "\n")
    return report


__all__ = ["ExportReport", "export_hf", "write_hf_dir", "check_parity", "PROBE_TEXTS"]
