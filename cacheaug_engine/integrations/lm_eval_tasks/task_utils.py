"""Helpers the task YAMLs beside this file name with ``!function task_utils.<name>`` (lm-eval imports this
file by path). The documents are generated offline by ``cacheaug_engine.data.reasoning``."""

from __future__ import annotations

from typing import Any


def _dataset(task: str, train: int, test: int, **kw: Any) -> Any:
    import datasets

    from cacheaug_engine.data.reasoning import TASKS

    make = TASKS[task]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(make("train", int(train), **kw)),
                                 "test": datasets.Dataset.from_list(make("test", int(test), **kw))})


def gsm_symbolic(train: int = 500, test: int = 200, seed: int = 0, **_: Any) -> Any:
    """GSM-Symbolic split by template (train: few-shot pool, test: scored); lm-eval's metadata is ignored."""
    return _dataset("gsm-symbolic", train, test, seed=int(seed))


def arithmetic(train: int = 500, test: int = 200, digits: int = 3, seed: int = 0, **_: Any) -> Any:
    """``a+b=`` problems with ``digits``-digit operands (test pairs never in the training data)."""
    return _dataset("arithmetic", train, test, digits=int(digits), seed=int(seed))


def ll_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Per document: ``ll`` the log-likelihood of the gold target (nats, summed over its tokens) and
    ``greedy`` whether greedy decoding would produce it."""
    ll, greedy = results[0]
    return {"ll": float(ll), "greedy": float(bool(greedy))}
