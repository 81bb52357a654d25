"""The ``pack:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec


@dataclass(frozen=True)
class PackConfig:
    """``pack:`` token rows written as Arrow shards."""

    seq_len: int = spec(256, ge=8, le=1 << 20)
    rows_per_shard: int = spec(4096, ge=1)
    sft_overflow: str = spec("truncate", choices=("truncate", "drop"))
    sft_packing: bool = spec(True, doc="pack several conversations into a row while they fit")
    batch_documents: int = spec(256, ge=1, doc="documents per encode_batch call")
    pretrain_chat_share: float = spec(0.5, ge=0.0, le=0.9, doc="share of the pretraining "
                                      "train tokens that are SFT train conversations")
    letters_share: float = spec(0.3, ge=0.0, le=0.9, doc="share of the SFT train "
                                "conversations that spell one vocabulary piece (the letters "
                                "curriculum; 0: none)")
