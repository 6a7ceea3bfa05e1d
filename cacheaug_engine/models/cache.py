"""KVCache: the per-layer key/value cache of a Decoder.

Layout: ``k[l]`` and ``v[l]`` are tensors [B, Hkv, C, Dh] for layer l (C = capacity,
keys already rotated by RoPE). Request b holds valid entries at [0, lens[b]); entry j of
request b sits at absolute position j. Slots past lens[b] are scratch space that decode
steps fill in place. ``max_len`` (a Python int, = max(lens)) is tracked alongside so that
capacity checks never read a device tensor.

Typical uses:

* ``Decoder.prefill`` returns a cache with C = T (or the requested capacity) and lens = T.
* ``cache.prefix(p)`` views the first p entries (no copy), e.g. to decode after a
  shorter prompt; ``cache.reserve(n)`` grows capacity for n entries (one copy, amortised);
  ``cache.append(ks, vs)`` writes a block of S entries per layer at each request's length
  and advances lens by S (``Decoder.extend`` and ``Decoder.decode_step`` do this).
* ``cache.repeat_interleave(n)`` / ``cache.select(idx)`` reorganise the batch.

Writes are in place and meant for inference (under ``torch.no_grad()``); the training
path (``Decoder.forward_blocks``) only reads the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Per-layer K/V tensors [B, Hkv, C, Dh] and per-request valid lengths ``lens`` (long [B])."""

    k: list[Tensor]
    v: list[Tensor]
    lens: Tensor
    max_len: int

    @classmethod
    def empty(
        cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> KVCache:
        """A zero-filled cache with room for ``capacity`` entries per request, lens = 0."""
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            lens=torch.zeros(batch, dtype=torch.long, device=device),
            max_len=0,
        )

    @classmethod
    def from_tensors(cls, k: list[Tensor], v: list[Tensor], lens: Tensor | None = None) -> KVCache:
        """Wrap per-layer tensors [B, Hkv, T, Dh]; lens defaults to T for every request."""
        b, _, t, _ = k[0].shape
        if lens is None:
            lens = torch.full((b,), t, dtype=torch.long, device=k[0].device)
            max_len = t
        else:
            lens = lens.to(device=k[0].device, dtype=torch.long)
            max_len = int(lens.max()) if lens.numel() else 0
        return cls(k=list(k), v=list(v), lens=lens, max_len=max_len)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.k)

    @property
    def batch_size(self) -> int:
        """B."""
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """C, the allocated entries per request."""
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the K/V tensors."""
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the K/V tensors."""
        return self.k[0].device

    def layer(self, i: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """(K, V) of layer i, viewed up to ``length`` entries (default max_len)."""
        n = self.max_len if length is None else length
        return self.k[i][:, :, :n], self.v[i][:, :, :n]

    # -- reorganise ----------------------------------------------------------------------------
    def prefix(self, length: int) -> KVCache:
        """Views of the first ``length`` entries (no copy); lens clipped to ``length``.

        The views share memory with this cache. Appending to the result never overwrites
        this cache's valid entries (it writes at positions >= the clipped lens, and grows by
        copying once it reaches ``length``) but may use its scratch slots past its own lens:
        ``clone()`` first if both caches are to grow.
        """
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length: expected 0 <= length <= capacity {self.capacity}, got {length}")
        return KVCache(
            k=[x[:, :, :length] for x in self.k], v=[x[:, :, :length] for x in self.v],
            lens=self.lens.clamp(max=length), max_len=min(self.max_len, length),
        )

    def select(self, index: Tensor | list[int]) -> KVCache:
        """Requests ``index`` (copies), e.g. to drop finished requests."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        lens = self.lens[idx]
        return KVCache([x[idx] for x in self.k], [x[idx] for x in self.v], lens,
                       int(lens.max()) if lens.numel() else 0)

    def repeat_interleave(self, n: int) -> KVCache:
        """Each request repeated n times (request b -> rows b*n .. b*n+n-1), copies."""
        k = [x.repeat_interleave(n, 0) for x in self.k]
        v = [x.repeat_interleave(n, 0) for x in self.v]
        return KVCache(k, v, self.lens.repeat_interleave(n), self.max_len)

    def clone(self) -> KVCache:
        """A deep copy."""
        k, v = [x.clone() for x in self.k], [x.clone() for x in self.v]
        return KVCache(k, v, self.lens.clone(), self.max_len)

    def detach(self) -> KVCache:
        """The same tensors cut from the autograd graph."""
        return KVCache([x.detach() for x in self.k], [x.detach() for x in self.v], self.lens, self.max_len)

    # -- grow / write --------------------------------------------------------------------------
    def reserve(self, needed: int) -> None:
        """Ensure capacity >= ``needed`` entries, reallocating (doubling) when short."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity, 64)
        for store in (self.k, self.v):
            for i, x in enumerate(store):
                b, h, c, d = x.shape
                grown = x.new_zeros(b, h, new_cap, d)
                grown[:, :, :c] = x
                store[i] = grown

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Write S entries [B, Hkv, S, Dh] of ``layer`` at [lens[b], lens[b] + S) (lens unchanged).

        Call ``reserve(max_len + S)`` first; ``append`` does both.
        """
        s = k_new.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        if self.max_len + s > kc.shape[2]:
            raise ValueError(
                f"KVCache.write: capacity {kc.shape[2]} < {self.max_len + s}; call reserve() first"
            )
        k_new, v_new = k_new.to(kc.dtype), v_new.to(vc.dtype)
        if s == 1:
            rows = torch.arange(kc.shape[0], device=kc.device)
            kc[rows, :, self.lens] = k_new[:, :, 0]
            vc[rows, :, self.lens] = v_new[:, :, 0]
            return
        idx = (self.lens.view(-1, 1) + torch.arange(s, device=kc.device)).view(-1, 1, s, 1)
        idx = idx.expand(-1, kc.shape[1], -1, kc.shape[3])
        kc.scatter_(2, idx, k_new)
        vc.scatter_(2, idx, v_new)

    def advance(self, n: int) -> None:
        """lens += n for every request."""
        self.lens = self.lens + n
        self.max_len += n

    def append(self, ks: list[Tensor], vs: list[Tensor]) -> None:
        """Append a block per layer (each [B, Hkv, S, Dh]) at each request's length; lens += S."""
        s = ks[0].shape[2]
        self.reserve(self.max_len + s)
        for i, (kn, vn) in enumerate(zip(ks, vs, strict=True)):
            self.write(i, kn, vn)
        self.advance(s)


def check_block_inputs(
    hidden_size: int, inputs_embeds: Tensor, positions: Tensor, cache: KVCache, prefix_lens: Tensor, block_len: int,
    output: str,
) -> int:
    """The shapes every decoder's ``forward_blocks`` takes (one ValueError naming the argument); returns B."""
    if output not in ("logits", "hidden"):
        raise ValueError(f"output: expected 'logits' or 'hidden', got {output!r}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(f"inputs_embeds: expected [B, N*S, {hidden_size}], got {tuple(inputs_embeds.shape)}")
    b, ns, _ = inputs_embeds.shape
    if not isinstance(block_len, int) or block_len < 1 or ns % block_len:
        raise ValueError(f"block_len: expected an int >= 1 dividing N*S = {ns}, got {block_len!r}")
    n = ns // block_len
    if tuple(positions.shape) != (b, ns):
        raise ValueError(f"positions: expected shape {(b, ns)}, got {tuple(positions.shape)}")
    if tuple(prefix_lens.shape) != (b, n):
        raise ValueError(f"prefix_lens: expected shape {(b, n)} [B, N], got {tuple(prefix_lens.shape)}")
    if cache.batch_size not in (1, b):
        raise ValueError(f"cache: batch {cache.batch_size} does not match inputs_embeds batch {b} (or 1)")
    return int(b)
