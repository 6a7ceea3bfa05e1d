"""Score and generate continuations of many contexts with the cache augmented once after each context.

The paper's evaluation setting, framework-free (the lm-eval adapter, ``integrations/lm_eval.py``,
is a thin layer on top):

1. **Prompt caches**: one right-padded prefill of a batch of contexts; then the method's latents
   (N_L rows, plus the last context token for the "early" placement) are appended to every
   row's cache by one ``extend``. The result holds, per context, the cache and the logits that
   predict the first continuation token.
2. **Scoring**: all continuations of all contexts of a batch run as blocks of one
   ``Decoder.forward_blocks`` pass over those caches (block k of row b attends to row b's whole
   prompt cache and causally to itself): a context shared by several choices is prefilled and
   augmented once, and no cache is copied.
3. **Generation**: a greedy (or sampled) decode loop over the same caches with per-request stop
   strings checked on the decoded text.

Methods (``METHODS``): "none" (the decoder alone: exactly the bare decoder), "coprocessor"
(the coprocessor's latents for each context), "pause" (a pause-table checkpoint: constant
latents), "shuffled" (the coprocessor's latents of the *previous* context in processing order;
the first context gets the last one's - latents computed from another document's cache),
"mean" (the coprocessor's mean latent over up to ``MEAN_CONTEXTS`` evenly spaced contexts of
the same request set, used everywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cacheaug_engine.augment.controls import shuffled_latents
from cacheaug_engine.augment.coprocessor import require_shifted
from cacheaug_engine.generation.sampling import pick_tokens
from cacheaug_engine.models import DecoderLike, KVCache

METHODS = ("none", "coprocessor", "pause", "shuffled", "mean")
# the checkpoint each method's latents come from: a coprocessor, a pause table, or none
NEEDS = {"none": None, "coprocessor": "coprocessor", "pause": "pause", "shuffled": "coprocessor", "mean": "coprocessor"}
MEAN_CONTEXTS = 32


@dataclass
class PromptCaches:
    """Augmented prompt caches of B contexts.

    Attributes:
        cache: row b valid at [0, lens[b]) (its context, then the latents and, for the early
            placement, the last context token).
        next_logits: float32 [B, V], the logits that predict each row's first continuation token.
        lens: per row, the cache entries (host ints).
    """

    cache: KVCache
    next_logits: Tensor
    lens: list[int]


@dataclass
class CallCounts:
    """How often the expensive steps ran (tests and logs read them)."""

    prefill_calls: int = 0
    prefill_rows: int = 0
    augment_rows: int = 0
    score_passes: int = 0
    decode_steps: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class AugmentedLM:
    """A frozen decoder plus one latent method, scoring and generating over augmented prompt caches.

    Args:
        decoder: the frozen decoder (``models.DecoderLike``).
        method: one of ``METHODS``.
        latents: for "coprocessor", "shuffled" and "mean", a coprocessor (``augment.Coprocessor``);
            for "pause", a pause table (a Coprocessor with ``latents="pause"``); None for "none".
        autocast_dtype: run under ``torch.autocast`` with this dtype (None: the weights' dtype).
    """

    def __init__(self, decoder: DecoderLike, method: str = "none", latents: torch.nn.Module | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if (method == "none") != (latents is None):
            need = "no latents module" if method == "none" else "a coprocessor (or, for pause, a pause table)"
            raise ValueError(f"method {method!r} needs {need}")
        if latents is not None:
            require_shifted(latents, f"AugmentedLM (method {method!r})")
            pause = bool(getattr(latents, "is_pause", False))
            if method == "pause" and not pause:
                raise ValueError("method 'pause' needs a pause-table checkpoint (trained with --latents pause)")
            if NEEDS[method] == "coprocessor" and pause:
                raise ValueError(f"method {method!r} needs a coprocessor checkpoint, got a pause table")
            latents.eval()
        self.decoder, self.method, self.latents = decoder, method, latents
        self.autocast_dtype = autocast_dtype
        self.counts = CallCounts()
        self._donor: Tensor | None = None  # shuffled: the previous context's latents [1, N_L, d]
        self._mean: Tensor | None = None  # mean: the constant table [N_L, d]

    # -- properties --------------------------------------------------------------------------------
    @property
    def num_latents(self) -> int:
        """N_L appended after each context (0 for "none")."""
        return 0 if self.latents is None else int(self.latents.num_latents)

    @property
    def tail(self) -> int:
        """Cache rows appended after a context's prefix: N_L, plus the last context token when "early"."""
        return 0 if self.latents is None else self.num_latents + (self.latents.placement == "early")

    def _autocast(self) -> torch.autocast | torch.autograd.grad_mode.no_grad:
        if self.autocast_dtype is None:
            return torch.no_grad()
        return torch.autocast(self.decoder.device.type, dtype=self.autocast_dtype)

    # -- per-request-set state ---------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, contexts: Sequence[Sequence[int]]) -> None:
        """Prepare for one request set whose distinct contexts, in processing order, are ``contexts``:
        the shuffled control's first donor (the last context) and the mean control's table."""
        self._donor, self._mean = None, None
        if self.method == "shuffled":
            if len(contexts) < 2:
                raise ValueError("method 'shuffled' needs >= 2 distinct contexts (with one there is no other cache)")
            self._donor = self._own_latents([list(contexts[-1])])
        elif self.method == "mean":
            n = len(contexts)
            k = min(n, MEAN_CONTEXTS)
            pick = [contexts[(i * n) // k] for i in range(k)]
            total = None
            for i in range(0, k, 8):
                z = self._own_latents([list(c) for c in pick[i : i + 8]]).double().sum(0)
                total = z if total is None else total + z
            assert total is not None
            self._mean = (total / k).float()

    # -- prompt caches ------------------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, rows: list[list[int]], pre: list[int], capacity: int) -> tuple[KVCache, Tensor | None]:
        """Right-padded prefill of rows[b][:pre[b]]; logits at each row's last prefix token (None if none)."""
        dec = self.decoder
        b, tp = len(rows), max(pre)
        ids = torch.zeros(b, tp, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : pre[i]] = torch.tensor(r[: pre[i]], dtype=torch.long)
        last = torch.tensor([max(p - 1, 0) for p in pre], dtype=torch.long).view(b, 1)
        with self._autocast():
            logits, cache = dec.prefill(ids.to(dec.device), capacity=capacity,
                                        logits_at=(last if tp else last[:, :0]).to(dec.device))[:2]
        self.counts.prefill_calls += 1
        self.counts.prefill_rows += b
        cache.lens = torch.tensor(pre, dtype=torch.long, device=dec.device)
        cache.max_len = tp
        return cache, (logits[:, 0] if tp else None)

    def _prefix_lens(self, rows: list[list[int]]) -> list[int]:
        early = self.latents is not None and self.latents.placement == "early"
        return [len(r) - 1 if early else len(r) for r in rows]

    @torch.no_grad()
    def _own_latents(self, rows: list[list[int]], cache: KVCache | None = None) -> Tensor:
        """The latents module's latents [B, N_L, d] for each row's context (prefilled here if no cache)."""
        assert self.latents is not None
        if cache is None:
            cache = self._prefill(rows, self._prefix_lens(rows), max(self._prefix_lens(rows)) + 1)[0]
        pos = torch.tensor([[len(r)] for r in rows], dtype=torch.long, device=self.decoder.device)
        with self._autocast():
            z = self.latents.latents_at(cache, pos)[:, 0]
        self.counts.augment_rows += len(rows)
        return z

    @torch.no_grad()
    def _method_latents(self, rows: list[list[int]], cache: KVCache) -> Tensor:
        if self.method == "mean":
            if self._mean is None:
                raise RuntimeError("method 'mean': call begin(contexts) first (the table is their mean latent)")
            return self._mean.view(1, *self._mean.shape).expand(len(rows), -1, -1)
        z = self._own_latents(rows, cache)
        if self.method != "shuffled":
            return z
        if self._donor is None:
            raise RuntimeError("method 'shuffled': call begin(contexts) first (the first context needs a donor)")
        # row b gets row b-1's latents, row 0 the donor (the previous batch's last context)
        out = shuffled_latents(torch.cat([self._donor.to(z.dtype), z]), shift=1)[1:]
        self._donor = z[-1:].clone()
        return out

    @torch.no_grad()
    def prompt_caches(self, rows: list[list[int]], room: int) -> PromptCaches:
        """Prefill and augment each context (>= 1 token) once; capacity for ``room`` more entries per row."""
        if not rows or any(len(r) < 1 for r in rows):
            raise ValueError("contexts: expected at least one context, each with >= 1 token")
        dec = self.decoder
        pre = self._prefix_lens(rows)
        tail = self.tail
        lens = [p + tail for p in pre]
        cache, logits = self._prefill(rows, pre, max(lens) + room)
        if self.latents is None:
            assert logits is not None
            return PromptCaches(cache, logits, lens)
        z = self._method_latents(rows, cache)
        nl = self.num_latents
        x = torch.zeros(len(rows), tail, dec.cfg.hidden_size, dtype=dec.dtype, device=dec.device)
        x[:, :nl] = z.to(x.dtype)
        if tail > nl:  # early placement: the last context token follows the latents
            last = torch.tensor([[r[-1]] for r in rows], dtype=torch.long, device=dec.device)
            x[:, nl] = dec.embed(last)[:, 0].to(x.dtype)
        with self._autocast():
            ext = dec.extend(inputs_embeds=x, cache=cache)  # writes at lens[b], lens += tail
        assert isinstance(ext, Tensor)
        return PromptCaches(cache, ext[:, -1].float(), lens)

    # -- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_logprobs(self, rows: list[list[int]], continuations: list[list[list[int]]],
                       caches: PromptCaches | None = None) -> list[list[Tensor]]:
        """Log-probs [L] (float32, CPU) of each token of each continuation of each context, and whether
        each token is the argmax, as a [2, L] tensor (row 0: log-prob, row 1: 1.0 where greedy).

        ``continuations[b]`` lists the continuations (each >= 1 token) of context ``rows[b]``; all of
        them are scored in one ``forward_blocks`` pass over the contexts' augmented prompt caches
        (``caches``: from :meth:`prompt_caches` of the same rows, which scoring leaves unchanged, so
        a later :meth:`generate` can decode from them; default: built here).
        """
        if len(continuations) != len(rows) or any(not cs for cs in continuations):
            raise ValueError("continuations: expected a non-empty list of continuations per context")
        if any(len(c) < 1 for cs in continuations for c in cs):
            raise ValueError("continuations: every continuation needs >= 1 token")
        dec = self.decoder
        dev = dec.device
        pc = self.prompt_caches(rows, room=0) if caches is None else caches
        first = torch.log_softmax(pc.next_logits.float(), -1)  # [B, V]
        b, n = len(rows), max(len(cs) for cs in continuations)
        s = max(len(c) for cs in continuations for c in cs) - 1
        hidden = None
        if s > 0:
            ids = torch.zeros(b, n * s, dtype=torch.long)
            for i, cs in enumerate(continuations):
                for k, c in enumerate(cs):
                    ids[i, k * s : k * s + len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            start = torch.tensor(pc.lens, dtype=torch.long).view(b, 1)
            positions = (start + torch.arange(s).repeat(n).view(1, n * s)).to(dev)
            prefix = start.expand(b, n).contiguous().to(dev)
            with self._autocast():
                emb = dec.embed(ids.to(dev))
                hidden = dec.forward_blocks(emb, positions, pc.cache, prefix, s, output="hidden")
            self.counts.score_passes += 1
        out: list[list[Tensor]] = []
        for i, cs in enumerate(continuations):
            res = []
            for k, c in enumerate(cs):
                tgt = torch.tensor(c, dtype=torch.long, device=dev)
                lp = [first[i : i + 1]]
                if len(c) > 1:
                    assert hidden is not None
                    with self._autocast():
                        lg = dec.logits(hidden[i, k * s : k * s + len(c) - 1])
                    lp.append(torch.log_softmax(lg.float(), -1))
                logp = torch.cat(lp)  # [L, V]
                tok = logp.gather(1, tgt.view(-1, 1))[:, 0]
                greedy = (logp.argmax(-1) == tgt).float()
                res.append(torch.stack([tok, greedy]).cpu())
            out.append(res)
        return out

    def score(self, rows: list[list[int]], continuations: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """(sum of log-probs, greedy?) of each continuation of each context (see :meth:`token_logprobs`)."""
        return [
            [(float(t[0].double().sum()), bool(t[1].all())) for t in per_context]
            for per_context in self.token_logprobs(rows, continuations)
        ]

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, rows: list[list[int]], *, max_new_tokens: int, stop: Callable[[int, list[int]], bool],
        eos_id: int | None = None, temperature: float = 0.0, seed: int = 0, caches: PromptCaches | None = None,
    ) -> list[list[int]]:
        """New tokens for each context (greedy at temperature 0), at most ``max_new_tokens``; row b stops
        after eos_id or once ``stop(b, tokens_so_far)`` is true (e.g. a stop string in the decoded text).
        ``caches``: the rows' prompt caches from :meth:`prompt_caches` with room >= ``max_new_tokens``
        (decoding writes into them); default: built here."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        dec = self.decoder
        if caches is not None and caches.cache.capacity - max(caches.lens) < max_new_tokens - 1:
            raise ValueError(f"caches: room for {caches.cache.capacity - max(caches.lens)} more entries, "
                             f"max_new_tokens {max_new_tokens} needs {max_new_tokens - 1}")
        pc = self.prompt_caches(rows, room=max_new_tokens) if caches is None else caches
        gen = torch.Generator(device=dec.device).manual_seed(seed)
        b = len(rows)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        logits = pc.next_logits
        for t in range(max_new_tokens):
            nxt = pick_tokens(logits, temperature, 0, gen)
            toks = nxt.tolist()
            for i in range(b):
                if done[i]:
                    continue
                out[i].append(toks[i])
                if (eos_id is not None and toks[i] == eos_id) or stop(i, out[i]):
                    done[i] = True
            if all(done) or t + 1 == max_new_tokens:
                break
            with self._autocast():
                logits = dec.decode_step(nxt, pc.cache)
            self.counts.decode_steps += 1
        return out
