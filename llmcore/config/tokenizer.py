"""The ``tokenizer:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec


@dataclass(frozen=True)
class TokenizerConfig:
    """``tokenizer:`` byte-level BPE training."""

    vocab_size: int = spec(4096, ge=260, le=65536 * 4)
    min_frequency: int = spec(2, ge=1)
    include_sft: bool = spec(True, doc="also train on the SFT conversations' text")
    max_train_bytes: int | None = spec(None, ge=1, doc="cap on the training text, in bytes")
    split_digits: bool = spec(True, doc="one token per digit (helps arithmetic)")
