"""The task evaluator (eval.task_eval) against an independent plain loop, and its held-out problems.

Oracle (tests/support/control_oracle.py, written from the contracts): per problem one causal pass over
[context[:start] ; latents ; context[start:] ; answer[:-1]] (start = len(context) - 1 for the "early"
placement, len(context) for "paper"), the last len(answer) rows scoring the answer; latents formed by
hand (pause: table x scale; coprocessor: hidden rows of [context[:start] ; soft tokens] x scale;
shuffled: the previous problem's; mean: the mean over the problems); greedy answers by a loop that
recomputes the whole sequence each token. float64: differences are rounding.
"""

from __future__ import annotations

import pytest
import torch
from control_oracle import block_start, copro_latents, pause_latents
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.data.tasks import PROBLEMS, heldout_problems, split_problem, task_documents
from cacheaug_engine.data.text import ByteTokenizer
from cacheaug_engine.eval.task_eval import evaluate_task, format_task_table

TOL = dict(rtol=1e-6, atol=1e-6)
FEW = dict(docs=2, per_doc=2, digits=1, seed=0)  # 1-digit problems: a small training set leaves most unseen


@pytest.fixture(scope="module")
def models():
    dec = tiny_decoder("llama", dtype=torch.float64)
    cop = Coprocessor(dec, 2, lora_rank=2, placement="early", seed=1)  # LoRA at zero init: network = decoder
    pause = Coprocessor(dec, 3, latents="pause", placement="paper", seed=2)
    with torch.no_grad():
        cop.log_scale.copy_(torch.tensor([0.6, 1.7]).log())
        pause.soft_tokens.add_(torch.randn(pause.soft_tokens.shape, generator=torch.Generator().manual_seed(3)))
        pause.log_scale.copy_(torch.tensor([1.04, 1.22, 0.8]).log())
    return dec, cop, pause


def _embed_seq(dec, ids: list[int], p: int, latents: torch.Tensor, placement: str) -> torch.Tensor:
    start = block_start(p, placement)  # p = the context's length: latents go after it ("early": before its last token)
    row = torch.tensor([ids])
    return torch.cat([dec.embed(row[:, :start]), latents.unsqueeze(0).to(dec.dtype), dec.embed(row[:, start:])], 1)


@torch.no_grad()
def _oracle(dec, ctx: list[int], ans: list[int], latents, placement: str, tok) -> tuple[torch.Tensor, str]:
    if latents is None:
        full = torch.tensor([ctx + ans[:-1]])
        logits = dec.prefill(full)[0][0]
    else:
        logits = dec.prefill(inputs_embeds=_embed_seq(dec, ctx + ans[:-1], len(ctx), latents, placement))[0][0]
        # the answer rows are the last len(ans) rows either way
    ce = torch.nn.functional.cross_entropy(logits[-len(ans):].double(), torch.tensor(ans), reduction="none")
    out: list[int] = []
    for _ in range(len(ans) + 2):  # the evaluator's budget: the longest answer in the batch + 2
        seq = ctx + out
        if latents is None:
            lg = dec.prefill(torch.tensor([seq]))[0][0, -1]
        else:
            lg = dec.prefill(inputs_embeds=_embed_seq(dec, seq, len(ctx), latents, placement))[0][0, -1]
        out.append(int(lg.argmax()))
        if "\n" in tok.decode(out):
            break
    return ce, tok.decode(out).split("\n", 1)[0].strip()


def test_every_method_matches_the_plain_loop(models):
    dec, cop, pause = models
    tok = ByteTokenizer()
    problems = heldout_problems("addition", 5, shots=1, digits=1, seed=7, train=FEW)
    for p in problems:  # one length per answer: the greedy budget (longest + 2) is the same for all
        p["answer"] = p["answer"][-1]
    res = evaluate_task(dec, tok, problems, coprocessor=cop, pause=pause, batch_size=2)
    ctxs = [tok.encode(p["context"]) for p in problems]
    anss = [tok.encode(p["answer"] + "\n") for p in problems]
    own = [copro_latents(dec, cop.soft_tokens, cop.log_scale, torch.tensor(c + a), len(c), "early")
           for c, a in zip(ctxs, anss, strict=True)]
    lat = {
        "decoder": [None] * 5,
        "coprocessor": own,
        "shuffled": [own[i - 1] for i in range(5)],  # the previous problem's; the first gets the last one's
        "mean": [torch.stack(own).mean(0)] * 5,
        "pause": [pause_latents(pause.soft_tokens, pause.log_scale)] * 5,
    }
    for m, per in lat.items():
        place = "paper" if m == "pause" else "early"
        for i in range(5):
            ce, said = _oracle(dec, ctxs[i], anss[i], per[i], place, tok)
            torch.testing.assert_close(torch.tensor(res["per_problem"][m]["ce"][i], dtype=torch.float64), ce,
                                       **TOL, msg=f"{m} problem {i}")
            assert res["per_problem"][m]["generated"][i] == said, (m, i)
            assert res["per_problem"][m]["exact"][i] == int(said == problems[i]["answer"])
    # the summaries are the per-problem numbers' means
    ce = torch.tensor(res["per_problem"]["pause"]["answer_ce"], dtype=torch.float64)
    assert res["methods"]["pause"]["answer_ce"] == pytest.approx(float(ce.mean()), rel=1e-9)
    d = res["paired"]["coprocessor vs pause"]["answer_ce"]["diff"]
    want = torch.tensor(res["per_problem"]["coprocessor"]["answer_ce"], dtype=torch.float64) - ce
    assert d == pytest.approx(float(want.mean()), rel=1e-9)
    assert "| pause |" in format_task_table(res, "t")


def test_exact_match_is_counted_on_the_gold_answer(models, monkeypatch):
    """A decoder that always says the gold answer scores 100%; the control that does not, 0%."""
    dec, cop, _ = models
    tok = ByteTokenizer()
    problems = heldout_problems("addition", 4, shots=0, digits=1, seed=3, train=FEW)
    from cacheaug_engine.eval import task_eval

    def fake_score(lm, tokenizer, items, answers, *, batch_size, desc):
        right = lm.method == "none"
        return {"ce": [[1.0] for _ in items], "exact": [int(right)] * len(items),
                "generated": [a if right else "x" for a in answers]}

    monkeypatch.setattr(task_eval, "score_method", fake_score)
    res = evaluate_task(dec, tok, problems, coprocessor=cop)
    assert res["methods"]["decoder"]["exact_match"] == 1.0 and res["methods"]["coprocessor"]["exact_match"] == 0.0
    e = res["paired"]["coprocessor vs decoder"]["exact_match"]
    assert e["diff"] == -1.0 and e["b_only"] == 4


def test_heldout_problems_never_repeat_a_training_question():
    train = dict(docs=300, per_doc=12, digits=2, seed=0)
    seen = {split_problem(line)[0] for d in task_documents("addition", **train) for line in d.split("\n")}
    probs = heldout_problems("addition", 200, shots=3, digits=2, seed=5, train=train)
    qs = [p["question"] for p in probs]
    shots = [line.split("=")[0] + "=" for p in probs for line in p["context"].split("\n")[:-1]]
    assert not (set(qs) | set(shots)) & seen
    assert len(set(qs + shots)) == len(qs) + len(shots)  # each question once in the test set
    for p in probs:
        a, b = map(int, p["question"][:-1].split("+"))
        assert p["answer"] == str(a + b) and p["context"].endswith(p["question"])
        assert p["context"].count("\n") == 3


def test_heldout_problems_refuse_the_training_seed_and_bad_input():
    with pytest.raises(ValueError, match="seed"):
        heldout_problems("addition", 2, seed=0)
    with pytest.raises(ValueError, match="task must be one of"):
        heldout_problems("subtraction", 2)
    with pytest.raises(ValueError, match="too few problems"):
        heldout_problems("addition", 50, shots=0, digits=1, train=dict(docs=10, per_doc=5, digits=1, seed=0))


def test_multistep_lines_are_correct():
    import random

    rng = random.Random(0)
    for _ in range(200):
        line = PROBLEMS["multistep"](rng, 2)
        q, a = split_problem(line)
        assert eval(q[:-1]) == int(a) >= 0  # noqa: S307 - digits and +/- only, made above
        assert len(q[:-1].replace("-", "+").split("+")) == 3


def test_evaluate_task_bad_input(models):
    dec, cop, _ = models
    tok = ByteTokenizer()
    probs = heldout_problems("addition", 2, shots=0, digits=1, seed=3, train=FEW)
    with pytest.raises(ValueError, match="'pause' needs a pause table"):
        evaluate_task(dec, tok, probs, coprocessor=cop, methods=["pause"])
    with pytest.raises(ValueError, match="needs a coprocessor"):
        evaluate_task(dec, tok, probs, methods=["shuffled"])
    with pytest.raises(ValueError, match="at least one problem"):
        evaluate_task(dec, tok, [], coprocessor=cop)


def test_one_prompt_cache_per_batch_serves_scoring_and_decoding(models, monkeypatch):
    """Scoring and greedy decoding read the same augmented cache: the shuffled control's donor advances
    once per batch (a second augmentation for decoding gave row 0 another problem's latents)."""
    from cacheaug_engine.generation.augmented_lm import AugmentedLM

    dec, cop, pause = models
    calls: list[str] = []
    real = AugmentedLM.prompt_caches

    def counted(self, rows, room):
        calls.append(self.method)
        return real(self, rows, room)

    monkeypatch.setattr(AugmentedLM, "prompt_caches", counted)
    probs = heldout_problems("addition", 5, shots=1, digits=1, seed=7, train=FEW)
    evaluate_task(dec, ByteTokenizer(), probs, coprocessor=cop, pause=pause, batch_size=2)
    assert sorted(set(calls)) == ["coprocessor", "mean", "none", "pause", "shuffled"]
    assert all(calls.count(m) == 3 for m in set(calls)), calls  # 5 problems in batches of 2: 3 batches
