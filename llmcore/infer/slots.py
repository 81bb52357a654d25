"""The engine's key/value storage: one row of every layer's keys and values per request slot.

A decode step advances every running request by one token in one batched forward, each row
at its own length; the prompts admitted together are prefilled in one forward of their own
cache, which :meth:`SlotCache.fill` copies into their slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmcore.infer.generate import KVCache, cache_tensors
from llmcore.model.protocols import LanguageModel


class SlotCache:
    """Keys and values for ``slots`` independent sequences of up to ``max_len`` tokens.

    ``lengths[i]`` counts the tokens cached in slot i (Python ints: the engine reads them every
    step, and a tensor would cost an op per read). A decode step over slots ``0..n-1`` writes
    each row's new key at its own length and masks every key past it, so rows of different
    lengths share one batched forward without seeing each other or stale keys.
    """

    def __init__(self, model: LanguageModel, slots: int, max_len: int) -> None:
        self.k, self.v = cache_tensors(model, slots, max_len)
        self.device = self.k[0].device
        self.lengths = [0] * slots
        self.max_len, self.offset, self.n = max_len, 0, 0
        self._rows = torch.arange(slots, device=self.device)
        self._at = self._rows
        self._mask: torch.Tensor | None = None
        self._span = 0

    def begin_step(self, n: int) -> torch.Tensor:
        """Prepare a one-token step over slots 0..n-1; returns their positions (n, 1)."""
        self.n = n
        self._span = max(self.lengths[:n]) + 1  # keys any row of this step can see
        at = torch.tensor(self.lengths[:n], device=self.device)  # (n,)
        self._at = at
        self._mask = None  # one row sees every key up to its own: no mask at all
        if n > 1:
            keys = torch.arange(self._span, device=self.device)
            self._mask = (keys[None, :] <= at[:, None])[:, None, None, :]  # (n, 1, 1, S)
        return at[:, None]

    def attn_mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        return self._mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, at = self._rows[: self.n], self._at
        self.k[layer][rows, :, at] = k[:, :, 0]
        self.v[layer][rows, :, at] = v[:, :, 0]
        return self.k[layer][: self.n, :, : self._span], self.v[layer][: self.n, :, : self._span]

    def advance(self, T: int) -> None:
        pass  # the engine advances only the rows that hold a request

    def fill(self, slots: Sequence[int], cache: KVCache, lengths: Sequence[int]) -> None:
        """Take a batched prefill: row r of ``cache`` becomes slot ``slots[r]``, holding
        ``lengths[r]`` tokens. The padding past a row's length is copied too, harmlessly: a
        decode step writes position p (the row's length) before any query can see it, and
        masks every key past it."""
        rows = torch.tensor(list(slots), device=self.device)
        span = cache.k[0].shape[2]
        for layer in range(len(self.k)):  # one indexed copy per tensor, whatever the rows
            self.k[layer][rows, :, :span] = cache.k[layer]
            self.v[layer][rows, :, :span] = cache.v[layer]
        for slot, n in zip(slots, lengths, strict=True):
            self.lengths[slot] = n
