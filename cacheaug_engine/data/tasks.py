"""Built-in synthetic tasks whose next tokens must be computed from the prompt (issue 10, item 6).

``addition``: lines ``a+b=c`` with random ``digits``-digit operands. The operand digits are
noise nobody can predict; the digits of ``c`` are a function of the prefix only, so a constant
latent (the pause control) cannot know them, while latents that read the cache can.
``multistep``: lines ``a+b-c=d`` / ``a-b+c=d`` ... with three ``digits``-digit operands and random
signs (two steps, carries and borrows; results >= 0). Written
as JSONL (one document of ``per_doc`` problems per line) for ``cacheaug train --data``::

    python -m cacheaug_engine.data.tasks addition --out add.jsonl
    cacheaug train --data add.jsonl ...          # and --latents pause for the control
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("addition", "multistep")


def addition_problem(rng: random.Random, digits: int) -> str:
    """One line ``a+b=c`` with ``digits``-digit operands (leading digit non-zero)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}+{b}={a + b}"


def multistep_problem(rng: random.Random, digits: int) -> str:
    """One line ``a±b±c=d`` with three ``digits``-digit operands, random signs and d >= 0 (redrawn
    otherwise: a tokenizer may merge ``=-`` into one token, which would put the answer's sign into
    the prompt)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    while True:
        a, b, c = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)
        s1, s2 = rng.choice("+-"), rng.choice("+-")
        value = a + (b if s1 == "+" else -b) + (c if s2 == "+" else -c)
        if value >= 0:
            return f"{a}{s1}{b}{s2}{c}={value}"


PROBLEMS = {"addition": addition_problem, "multistep": multistep_problem}


def task_documents(name: str, *, docs: int = 2000, per_doc: int = 12, digits: int = 3, seed: int = 0) -> list[str]:
    """``docs`` documents of ``per_doc`` problems each (one problem per line), reproducible from ``seed``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    if docs < 1 or per_doc < 1 or not 1 <= digits <= 18:
        raise ValueError(f"need docs >= 1, per_doc >= 1, 1 <= digits <= 18; got {docs}, {per_doc}, {digits}")
    rng = random.Random(seed)
    make = PROBLEMS[name]
    return ["\n".join(make(rng, digits) for _ in range(per_doc)) for _ in range(docs)]


def split_problem(line: str) -> tuple[str, str]:
    """``"a+b=c"`` -> (question ``"a+b="``, answer ``"c"``)."""
    q, sep, a = line.rpartition("=")
    if not sep or not q or not a:
        raise ValueError(f"not a task line 'question=answer': {line!r}")
    return q + sep, a


def heldout_problems(
    name: str, n: int, *, shots: int = 8, digits: int = 3, seed: int = 1, train: dict[str, int] | None = None
) -> list[dict[str, str]]:
    """``n`` test problems none of whose questions occurs in the training documents
    (``task_documents(name, **train)``, default: ``task_documents``'s defaults with ``digits``), each
    with ``shots`` solved lines before it (themselves unseen), in the training text's format.

    Each: ``context`` (``shots`` lines ``q=a`` and the question, newline-joined), ``question``,
    ``answer``. Reproducible from ``seed`` (which must differ from the training seed)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    if n < 1 or shots < 0:
        raise ValueError(f"need n >= 1 and shots >= 0, got {n}, {shots}")
    train = dict(train or {"digits": digits})
    if train.get("seed", 0) == seed:
        raise ValueError(f"seed: the test problems need a seed other than the training seed ({seed})")
    seen = {split_problem(line)[0] for doc in task_documents(name, **train) for line in doc.split("\n")}
    rng, make = random.Random(seed), PROBLEMS[name]
    out: list[dict[str, str]] = []
    tries = 0
    while len(out) < n:
        lines = []
        while len(lines) < shots + 1:
            tries += 1
            if tries > 100 * (n * (shots + 1)):
                raise ValueError(f"{name} with {digits} digits: too few problems unseen in training")
            line = make(rng, digits)
            q = split_problem(line)[0]
            if q not in seen:
                seen.add(q)  # each question once in the whole test set
                lines.append(line)
        q, a = split_problem(lines[-1])
        out.append({"context": "\n".join([*lines[:-1], q]), "question": q, "answer": a})
    return out


def write_task(path: str | Path, name: str = "addition", **kw: int) -> Path:
    """Write the task's documents as JSONL (``{"text": ...}`` per line) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in task_documents(name, **kw):
            f.write(json.dumps({"text": text}) + "\n")
    return path
