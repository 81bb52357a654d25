"""What the model asks of a KV cache, and what a caller may ask of a model.

* :class:`KVCacheLike` is the contract :class:`~llmcore.model.transformer.Transformer`'s
  forward relies on. :class:`llmcore.infer.generate.KVCache` (one batch of sequences) and
  :class:`llmcore.infer.slots.SlotCache` (independent slots of a batching engine) are its
  two implementations; the model imports neither.
* :class:`LanguageModel` is what generation, evaluation, alignment and serving call: token
  ids (B, T) in, logits (B, T, V) out, with an optional cache and positions, plus the config
  and parameters they read the shapes, device and dtype from. The transformer satisfies it,
  and so does a compiled or wrapped one that keeps these attributes.
* :class:`RowDataset` is what held-out scoring (:mod:`llmcore.model.loss`) reads rows from:
  :class:`llmcore.data.shards.ShardDataset` and its ``RowSubset`` satisfy it, and the model
  imports neither.

Trade-off: structural typing (``typing.Protocol``), so a test's rigged model or a wrapper
qualifies without inheriting anything; the price is that a mismatch shows up in the type
checker, not at construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from llmcore.config.model import ModelConfig


class KVCacheLike(Protocol):
    """Keys and values of past positions, written by the model one forward at a time."""

    offset: int  # positions already cached (the first new query's position)
    max_len: int  # positions it can hold: every position written is below it

    def attn_mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """(mask over the cached + new keys, or None; is_causal) for T new queries."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, K, T, Hd) keys/values of ``layer``; return all of them so far."""
        ...

    def advance(self, n: int) -> None:
        """The forward of ``n`` new positions is complete."""
        ...


class LanguageModel(Protocol):
    """A decoder: token ids (B, T) -> logits (B, T, V)."""

    cfg: ModelConfig
    training: bool

    def __call__(self, input_ids: torch.Tensor, cache: KVCacheLike | None = None,
                 positions: torch.Tensor | None = None,
                 segments: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def num_parameters(self) -> int: ...

    def eval(self) -> LanguageModel: ...

    def train(self, mode: bool = True) -> LanguageModel: ...


class RowDataset(Protocol):
    """Packed rows of ``row_len`` tokens, read by index (a shard split, or some of its rows)."""

    @property
    def eot_id(self) -> int: ...

    def __len__(self) -> int: ...

    def gather(self, indices: Sequence[int] | np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids (n, row_len) and loss mask (None for pretraining rows) at ``indices``."""
        ...

    def segments(self, indices: Sequence[int] | np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The document number of each token of the rows at ``indices`` (``ids`` are theirs)."""
        ...
