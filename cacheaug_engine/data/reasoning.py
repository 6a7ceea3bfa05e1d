"""Offline reasoning tasks for lm-eval (``integrations/lm_eval_tasks``) and for training on their train split.

* **GSM-Symbolic** (reasoning-gym's GSM8K-derived templates, an optional extra:
  ``pip install cacheaug-engine[eval]``): grade-school word problems with a worked solution in GSM8K's
  format (steps, then ``#### N``). The split is **by template**: every ``GSM_TEST_EVERY``-th usable
  template (in id order) is a test template, the others are train templates, so no test template
  is ever trained on or used as a few-shot example.
* **Arithmetic**: ``a+b=`` with ``digits``-digit operands in the ``cacheaug tasks addition`` format
  (the shipped addition coprocessor's training data, ``data.tasks``); test problems exclude every
  pair of that training set (``ADDITION_TRAIN``).

Each document: ``question``, ``answer`` (a string), ``choices`` (the gold answer and three near
misses, shuffled) and ``gold`` (its index); GSM documents also carry ``solution`` (the worked
solution, ending ``#### answer``) and ``template``. Everything is reproducible from ``seed``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from cacheaug_engine.data.tasks import task_documents

GSM_TEST_EVERY = 5
SPLITS = ("train", "test")
# the shipped addition coprocessor's data: cacheaug tasks addition (defaults), 2000 x 12 problems, seed 0
ADDITION_TRAIN = dict(docs=2000, per_doc=12, digits=3, seed=0)
_SPLIT_SEED = {"train": 0, "test": 1_000_003}


def _check(split: str, n: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1 (documents), got {n!r}")


def _gsm_generators() -> dict[int, Callable[[random.Random, float], dict[str, Any]]]:
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99
        from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as gs
    except ImportError as e:
        raise ImportError(
            f"GSM-Symbolic needs reasoning-gym ({e}); install the eval extra: pip install 'cacheaug-engine[eval]'"
        ) from None
    gens = {}
    for mod in (generators_00_49, generators_50_99):
        for name in dir(mod):
            if name.startswith("generate_"):
                gens[int(name[len("generate_") :])] = getattr(mod, name)
    return {i: gens[i] for i in sorted(gs.tasks_ok)}


def gsm_templates() -> dict[str, list[int]]:
    """Template ids per split: every GSM_TEST_EVERY-th usable template (by id) is a test template."""
    ids = sorted(_gsm_generators())
    return {"train": [t for k, t in enumerate(ids) if k % GSM_TEST_EVERY != 0],
            "test": [t for k, t in enumerate(ids) if k % GSM_TEST_EVERY == 0]}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def near_misses(answer: str, rng: random.Random, k: int = 3) -> list[str]:
    """``k`` distinct wrong answers close to a numeric ``answer`` (off by one, by ten, doubled, halved...)."""
    g = _number(answer)
    cands = [g + 1, g - 1, g + 2, g - 2, g + 10, g - 10, g * 2, g / 2, g + 5, g - 5, g * 10, g + 100]
    out: list[str] = []
    for c in rng.sample(cands, len(cands)):
        s = _fmt(c)
        if c >= 0 and s != _fmt(g) and s not in out:
            out.append(s)
        if len(out) == k:
            return out
    raise ValueError(f"no {k} distinct near misses for answer {answer!r}")


def _with_choices(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    choices = [doc["answer"], *near_misses(doc["answer"], rng)]
    rng.shuffle(choices)
    return {**doc, "choices": choices, "gold": choices.index(doc["answer"])}


def gsm_symbolic_docs(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` GSM-Symbolic problems of ``split``'s templates (cycled in order), reproducible from ``seed``."""
    _check(split, n)
    gens = _gsm_generators()
    templates = gsm_templates()[split]
    docs = []
    for i in range(n):
        t = templates[i % len(templates)]
        rng = random.Random(f"gsm/{split}/{seed}/{i}")
        ex = gens[t](rng, 1.0)
        answer = _fmt(_number(str(ex["answer"])))
        steps = ex["metadata"]["answer_cot"].rstrip().rsplit("####", 1)[0].rstrip()
        doc = {"id": i, "template": t, "question": ex["question"], "answer": answer,
               "solution": f"{steps}\n#### {answer}"}  # one spelling of the answer (e.g. "20", never "20.0")
        docs.append(_with_choices(doc, rng))
    return docs


def arithmetic_docs(split: str, n: int, digits: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` problems ``a+b=`` with ``digits``-digit operands; the test split never repeats a pair of the
    shipped addition coprocessor's training data, and train and test never share a pair."""
    _check(split, n)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
        raise ValueError(f"digits: expected an int in [1, 18], got {digits!r}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if (hi - lo + 1) ** 2 < 4 * n:
        raise ValueError(f"digits {digits} has too few distinct problems for {n} documents")
    seen: set[tuple[int, int]] = set()
    if digits == ADDITION_TRAIN["digits"]:
        for doc in task_documents("addition", **ADDITION_TRAIN):
            for line in doc.split("\n"):
                a, rest = line.split("+")
                seen.add((int(a), int(rest.split("=")[0])))
    if split == "test":  # keep the train split's pairs out of the test split too
        seen |= {(d["a"], d["b"]) for d in arithmetic_docs("train", max(n, 500), digits, seed)}
    rng = random.Random(f"arith/{split}/{digits}/{seed + _SPLIT_SEED[split]}")
    docs: list[dict[str, Any]] = []
    while len(docs) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        doc = {"id": len(docs), "a": a, "b": b, "question": f"{a}+{b}=", "answer": str(a + b)}
        docs.append(_with_choices(doc, rng))
    return docs


TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {"gsm-symbolic": gsm_symbolic_docs,
                                                         "arithmetic": arithmetic_docs}
DEFAULT_DOCS = {"train": 500, "test": 200}
