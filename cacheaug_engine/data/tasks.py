"""Built-in synthetic tasks whose next tokens must be computed from the prompt (issue 10, item 6).

``addition``: lines ``a+b=c`` with random ``digits``-digit operands. The operand digits are
noise nobody can predict; the digits of ``c`` are a function of the prefix only, so a constant
latent (the pause control) cannot know them, while latents that read the cache can. Written
as JSONL (one document of ``per_doc`` problems per line) for ``cacheaug train --data``::

    python -m cacheaug_engine.data.tasks addition --out add.jsonl
    cacheaug train --data add.jsonl ...          # and --latents pause for the control
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("addition",)


def addition_problem(rng: random.Random, digits: int) -> str:
    """One line ``a+b=c`` with ``digits``-digit operands (leading digit non-zero)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}+{b}={a + b}"


def task_documents(name: str, *, docs: int = 2000, per_doc: int = 12, digits: int = 3, seed: int = 0) -> list[str]:
    """``docs`` documents of ``per_doc`` problems each (one problem per line), reproducible from ``seed``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    if docs < 1 or per_doc < 1 or not 1 <= digits <= 18:
        raise ValueError(f"need docs >= 1, per_doc >= 1, 1 <= digits <= 18; got {docs}, {per_doc}, {digits}")
    rng = random.Random(seed)
    return ["\n".join(addition_problem(rng, digits) for _ in range(per_doc)) for _ in range(docs)]


def write_task(path: str | Path, name: str = "addition", **kw: int) -> Path:
    """Write the task's documents as JSONL (``{"text": ...}`` per line) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in task_documents(name, **kw):
            f.write(json.dumps({"text": text}) + "\n")
    return path
