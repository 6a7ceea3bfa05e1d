"""The lm-eval model "cacheaug" on a tiny random decoder: augment=none is the bare decoder, augmented
scores equal a hand-built [context ; latents ; continuation] pass, a shared context is prefilled and
augmented once, generation stops where it should, and lm-eval's own simple_evaluate runs it."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import tiny_config

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from cacheaug_engine.augment import Coprocessor  # noqa: E402
from cacheaug_engine.integrations.lm_eval import CacheAugLM  # noqa: E402
from cacheaug_engine.models.loaders import load_model  # noqa: E402
from cacheaug_engine.train.checkpoint import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    cfg = d / "tiny.json"
    c = tiny_config("llama")
    c.vocab_size = 259  # the byte tokenizer's vocabulary
    cfg.write_text(json.dumps(c.to_dict()))
    spec = f"random:{cfg}"
    dec = load_model(spec)
    ckpts = {}
    for name, kw in {"paper": dict(placement="paper"), "early": dict(placement="early"),
                     "pause": dict(placement="early", latents="pause")}.items():
        cop = Coprocessor(dec, num_latents=2, lora_rank=2, seed=3, **kw)
        with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
            for m in cop.adapters():
                for p in m.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.05)
        ckpts[name] = save_checkpoint(d / name, coprocessor=cop.trainable_state(),
                                      state={"coprocessor": cop.config.to_dict(), "step": 0})
    return spec, dec, ckpts


def lm(env, **kw):
    spec, _, ckpts = env
    for key in ("coprocessor", "pause"):
        if kw.get(key) in ckpts:
            kw[key] = str(ckpts[kw[key]])
    return CacheAugLM(pretrained=spec, device="cpu", **kw)


def ll_req(ctx, cont):
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def reference(model, ctx_ids, cont_ids, latents=None):
    """(sum log p(cont | ctx [+ latents]), greedy?) from one plain pass over the embeddings."""
    dec = model.model.decoder
    pre = len(ctx_ids)
    parts = [dec.embed(torch.tensor([ctx_ids]))]
    if latents is not None:
        early = model.model.latents.placement == "early"
        pre -= early
        parts = [dec.embed(torch.tensor([ctx_ids[:pre]], dtype=torch.long)), latents.view(1, -1, latents.shape[-1]),
                 dec.embed(torch.tensor([ctx_ids[pre:]], dtype=torch.long))]
    x = torch.cat([*parts, dec.embed(torch.tensor([cont_ids]))], 1)
    with torch.no_grad():
        logp = torch.log_softmax(dec.prefill(inputs_embeds=x)[0][0].float(), -1)
    start = x.shape[1] - len(cont_ids) - 1
    rows = logp[start : start + len(cont_ids)]
    tgt = torch.tensor(cont_ids)
    return float(rows.gather(1, tgt.view(-1, 1)).sum()), bool((rows.argmax(-1) == tgt).all())


def own_latents(model, ctx_ids):
    """The latents module's latents [N_L, d] for one context, computed by hand."""
    dec, cop = model.model.decoder, model.model.latents
    pre = len(ctx_ids) - (cop.placement == "early")
    with torch.no_grad():
        cache = dec.prefill(torch.tensor([ctx_ids[:pre]], dtype=torch.long))[1]
        return cop.latents_at(cache, torch.tensor([[len(ctx_ids)]]))[0, 0]


PAIRS = [("Question: 2+2=", " 4"), ("Question: 2+2=", " 5"), ("Question: 2+2=", " four!"),
         ("Another, longer context here", " yes"), ("x", "yz")]


def test_augment_none_equals_the_decoder(env):
    m = lm(env, augment="none", batch_size=2)
    got = m.loglikelihood([ll_req(c, x) for c, x in PAIRS])
    for (c, x), (ll, greedy) in zip(PAIRS, got, strict=True):
        want_ll, want_greedy = reference(m, m.tok_encode(c), m.tok_encode(x))
        assert ll == pytest.approx(want_ll, abs=1e-5)
        assert greedy == want_greedy


def test_is_greedy(env):
    m = lm(env, augment="none")
    ctx = m.tok_encode("abc")
    dec = m.model.decoder
    with torch.no_grad():  # the decoder's own greedy continuation of 4 tokens
        seq = list(ctx)
        for _ in range(4):
            seq.append(int(dec(torch.tensor([seq]))[0, -1].argmax()))
    greedy = seq[len(ctx):]
    other = greedy[:2] + [(greedy[2] + 1) % 259] + greedy[3:]
    (ll_g, is_g), (ll_o, is_o) = m._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert is_g is True and is_o is False
    assert ll_g == pytest.approx(reference(m, ctx, greedy)[0], abs=1e-5)


@pytest.mark.parametrize("ckpt", ["paper", "early"])
def test_coprocessor_scores_equal_a_hand_built_pass(env, ckpt):
    m = lm(env, augment="coprocessor", coprocessor=ckpt, batch_size=2)
    got = m.loglikelihood([ll_req(c, x) for c, x in PAIRS])
    plain = lm(env, augment="none").loglikelihood([ll_req(c, x) for c, x in PAIRS])
    for (c, x), (ll, greedy), (ll0, _) in zip(PAIRS, got, plain, strict=True):
        ci = m.tok_encode(c)
        want_ll, want_greedy = reference(m, ci, m.tok_encode(x), own_latents(m, ci))
        assert ll == pytest.approx(want_ll, abs=1e-5)
        assert greedy == want_greedy
        assert abs(ll - ll0) > 1e-4  # the latents change the scores


def test_pause_shuffled_and_mean_controls(env):
    pairs = [("first context", " a"), ("the second one", " b"), ("third", " cc")]
    reqs = [ll_req(c, x) for c, x in pairs]
    m = lm(env, augment="pause", pause="pause")
    table = m.model.latents.soft_tokens * m.model.latents.scale().view(-1, 1)
    for (c, x), (ll, _) in zip(pairs, m.loglikelihood(reqs), strict=True):
        assert ll == pytest.approx(reference(m, m.tok_encode(c), m.tok_encode(x), table.detach())[0], abs=1e-5)
    # shuffled: each context gets the latents of the previous context in processing order (longest
    # first; the first gets the last one's), whatever the batch size
    res = {}
    for bs in (1, 2, 3):
        res[bs] = [ll for ll, _ in lm(env, augment="shuffled", coprocessor="paper", batch_size=bs).loglikelihood(reqs)]
    assert res[1] == pytest.approx(res[2], abs=1e-6) and res[1] == pytest.approx(res[3], abs=1e-6)
    m = lm(env, augment="shuffled", coprocessor="paper")
    order = sorted(range(3), key=lambda i: -len(m.tok_encode(pairs[i][0])))
    for k, i in enumerate(order):
        donor = order[k - 1]
        ci = m.tok_encode(pairs[i][0])
        want = reference(m, ci, m.tok_encode(pairs[i][1]), own_latents(m, m.tok_encode(pairs[donor][0])))[0]
        assert res[1][i] == pytest.approx(want, abs=1e-5)
    # mean: the mean latent over the request set's contexts, the same after every context
    m = lm(env, augment="mean", coprocessor="paper")
    got = m.loglikelihood(reqs)
    mean = torch.stack([own_latents(m, m.tok_encode(c)) for c, _ in pairs]).mean(0)
    for (c, x), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(reference(m, m.tok_encode(c), m.tok_encode(x), mean)[0], abs=1e-5)
    with pytest.raises(ValueError, match="needs >= 2 distinct contexts"):
        lm(env, augment="shuffled", coprocessor="paper").loglikelihood([ll_req("only", " one")])


def test_shared_context_is_prefilled_and_augmented_once(env, monkeypatch):
    m = lm(env, augment="coprocessor", coprocessor="early", batch_size=8)
    dec, cop = m.model.decoder, m.model.latents
    calls = {"prefill": 0, "prefill_rows": 0, "latents_rows": 0}
    real_prefill, real_latents = dec.prefill, cop.latents_at

    def prefill(*a, **kw):
        ids = a[0] if a else kw.get("input_ids")
        calls["prefill"] += 1
        calls["prefill_rows"] += ids.shape[0]
        return real_prefill(*a, **kw)

    def latents_at(cache, pos, *a, **kw):
        calls["latents_rows"] += pos.shape[0]
        return real_latents(cache, pos, *a, **kw)

    monkeypatch.setattr(dec, "prefill", prefill)
    monkeypatch.setattr(cop, "latents_at", latents_at)
    choices = [" alpha", " beta", " gamma delta", " e"]
    reqs = [ll_req("Which one? Answer:", x) for x in choices] + [ll_req("Other question:", x) for x in choices[:2]]
    got = m.loglikelihood(reqs)
    assert calls == {"prefill": 1, "prefill_rows": 2, "latents_rows": 2}
    assert m.model.counts.score_passes == 1
    # the same numbers as one request at a time
    single = [m.loglikelihood([r])[0] for r in reqs]
    assert [g[0] for g in got] == pytest.approx([s[0] for s in single], abs=1e-5)


def test_loglikelihood_rolling(env):
    text = "Rolling log-likelihood of a whole text."
    for kw in (dict(augment="none"), dict(augment="coprocessor", coprocessor="paper")):
        m = lm(env, **kw)
        (got,) = m.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        toks = m.tok_encode(text)
        lat = own_latents(m, [m.prefix_token_id]) if m.model.latents is not None else None
        assert got == pytest.approx(reference(m, [m.prefix_token_id], toks, lat)[0], abs=1e-4)
    # several windows: each window's tokens are scored once, so the total is the sum over windows
    m = lm(env, augment="none", max_length=12)
    (got,) = m.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    toks = m.tok_encode(text)
    # lm-eval's windows: the first predicts 12 tokens after the prefix token, each later one predicts up to
    # 12 more after the 13 - n tokens before them (the window's own context)
    first = min(12, len(toks))
    want, done = reference(m, [m.prefix_token_id], toks[:first])[0], first
    while done < len(toks):
        end = done + min(len(toks) - done, 12)
        want += reference(m, toks[end - 13 : done], toks[done:end])[0]
        done = end
    assert got == pytest.approx(want, abs=1e-4)


class CharTokenizer:
    """One printable character per id (ASCII first): every generated token decodes to exactly one char."""

    chars = "".join(chr(c) for c in range(32, 127)) + "".join(chr(0x100 + i) for i in range(259 - 95))
    eos_token_id = 258

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def gen_req(ctx, **kw):
    return Instance(request_type="generate_until", doc={}, arguments=(ctx, kw), idx=0)


def test_generate_until_stops_where_it_should(env):
    m = lm(env, augment="coprocessor", coprocessor="early", batch_size=3, tokenizer=CharTokenizer())
    ctxs = ["Once upon a time", "The answer is", "zz"]
    full = m.generate_until([gen_req(c, until=[], max_gen_toks=12) for c in ctxs])
    assert [len(t) for t in full] == [12, 12, 12]  # (no eos: the tiny model never picks id 258 here)
    # batched == one at a time (right padding never leaks into a shorter row)
    one = lm(env, augment="coprocessor", coprocessor="early", batch_size=1, tokenizer=CharTokenizer())
    assert one.generate_until([gen_req(c, until=[], max_gen_toks=12) for c in ctxs]) == full
    # per-request stop strings, in one call: each row ends before its own stop string's first occurrence
    stops = [t[3:5] for t in full]
    reqs = [gen_req(c, until=[s], max_gen_toks=12) for c, s in zip(ctxs, stops, strict=True)]
    reqs.append(gen_req(ctxs[0], until=[], max_gen_toks=3))
    steps0 = m.model.counts.decode_steps
    got = m.generate_until(reqs)
    assert got[:3] == [t.split(s)[0] for t, s in zip(full, stops, strict=True)]
    assert got[3] == m.tok_decode(m.tok_encode(full[0])[:3])
    assert m.model.counts.decode_steps - steps0 < 2 * 11  # the stop-string rows ended early
    # augment=none generates what the library's one generation path generates for the bare decoder
    from cacheaug_engine.generation import generate

    plain = lm(env, augment="none", batch_size=3, tokenizer=CharTokenizer())
    want = generate(plain.model.decoder, [plain.tok_encode(c) for c in ctxs], max_new_tokens=12).tokens
    assert plain.generate_until([gen_req(c, until=[], max_gen_toks=12) for c in ctxs]) == [
        plain.tok_decode(t) for t in want]


def test_bad_model_args_fail_before_loading(env):
    for kw, msg in [(dict(augment="magic"), "augment: expected one of"),
                    (dict(augment="coprocessor"), "needs coprocessor="),
                    (dict(augment="pause"), "needs pause="),
                    (dict(batch_size="auto"), "batch_size"),
                    (dict(dtype="int8"), "dtype"),
                    (dict(augment="pause", pause="paper"), "holds a coprocessor")]:
        with pytest.raises(ValueError, match=msg):
            lm(env, **kw)


def tiny_tasks(d):
    """Two local task YAMLs (multiple choice, generation) over 4 addition documents in ``d``."""
    docs = [{"q": f"{a}+{b}=", "a": str(a + b), "choices": [str(a + b), str(a + b + 1)], "gold": 0}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return d


def test_simple_evaluate_runs_the_registered_model(env, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    spec, _, ckpts = env
    out = lm_eval.simple_evaluate(
        model="cacheaug", model_args=f"pretrained={spec},augment=coprocessor,coprocessor={ckpts['paper']},device=cpu",
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tiny_tasks(tmp_path))), limit=3,
        log_samples=True, bootstrap_iters=0,
    )
    assert set(out["results"]) == {"tiny_mc", "tiny_gen"}
    assert len(out["samples"]["tiny_mc"]) == 3 and "acc" in out["samples"]["tiny_mc"][0]
    assert 0.0 <= out["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_cli_runs_every_method_and_pairs_them(env, tmp_path, capsys):
    from cacheaug_engine.cli.main import main

    spec, _, ckpts = env
    out = tmp_path / "out"
    argv = ["lm-eval", "--tasks", "tiny_mc", "--include-path", str(tiny_tasks(tmp_path)),
            "--model-args", f"pretrained={spec}", "--coprocessor", str(ckpts["paper"]), "--pause", str(ckpts["pause"]),
            "--limit", "4", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "lm_eval.json").read_text())
    assert (out / "lm_eval.png").is_file()
    assert report["methods"] == ["none", "coprocessor", "pause", "shuffled", "mean"]
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    assert set(rows) == {("tiny_mc", "acc")}
    for r in rows.values():
        assert set(r["diffs"]) == {"none", "pause", "shuffled", "mean"} and r["docs"] == 4
        for m, d in r["diffs"].items():  # the paired mean difference is the difference of the scores
            assert d["diff"] == pytest.approx(r["scores"]["coprocessor"] - r["scores"][m], abs=1e-9)
            assert d["lo"] <= d["diff"] <= d["hi"] and d["method"] == "exact"
    assert set(report["seconds"]["mean"]) == {"tiny_mc"} and report["model_seconds"]["mean"]["tiny_mc"] > 0
    assert list((out / "lm_eval" / "none").rglob("samples_tiny_mc_*.jsonl"))  # lm-eval's own files are kept
    assert "coprocessor-none" in capsys.readouterr().out.replace("copro-none", "coprocessor-none")
    # bad input: one line, exit code 2, before any model load
    assert main(["lm-eval", "--tasks", "no_such_task", "--model-args", f"pretrained={spec}", "--methods", "none",
                 "--out", str(out)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["lm-eval", "--tasks", "tiny_mc", "--methods", "none,magic", "--out", str(out)]) == 2
    assert main(["lm-eval", "--tasks", "tiny_mc", "--model-args", "augment=pause", "--out", str(out)]) == 2
