"""DVC stage ``tokenizer``: train byte-level BPE on the corpus into ``data/tokenizer/``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from llmcore.config.tokenizer import TokenizerConfig
from llmcore.data.corpus import read_conversations, read_texts
from llmcore.data.tokenizer import LLMTokenizer, bytes_per_token, train_bpe, training_texts
from llmcore.files import atomic_dir
from llmcore.tracking import Tracker
from stages import paths
from stages._common import StageParams, log, repo_root, run_stage

STAGE = "tokenizer"
CORPUS, OUT = paths.CORPUS, paths.TOKENIZER


@dataclass(frozen=True)
class Params(StageParams):
    tokenizer: TokenizerConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, root = p.tokenizer, repo_root()
    convs = read_conversations(root / CORPUS, "train") if cfg.include_sft else []
    texts = training_texts(read_texts(root / CORPUS, "train"), convs, cfg.max_train_bytes)
    start = time.perf_counter()
    tok = LLMTokenizer(train_bpe(texts, cfg.vocab_size, cfg.min_frequency, cfg.split_digits))
    seconds = time.perf_counter() - start
    atomic_dir(root / OUT, tok.save)
    bpt = bytes_per_token(tok, read_texts(root / CORPUS, "val"))
    log(f"tokenizer: vocab {tok.vocab_size}, {bpt:.3f} bytes/token on val, trained in {seconds:.1f}s")
    tracker.log_artifact(root / OUT, "tokenizer")
    return {"tokenizer/vocab_size": tok.vocab_size, "tokenizer/bytes_per_token_val": round(bpt, 4),
            "tokenizer/train_texts": len(texts), "tokenizer/train_seconds": round(seconds, 3)}


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
