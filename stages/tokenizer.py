"""DVC stage ``tokenizer``: train byte-level BPE on the corpus into ``data/tokenizer/``."""

from __future__ import annotations

import time

from llmcore.corpus import read_conversations, read_texts
from llmcore.tokenizer import LLMTokenizer, bytes_per_token, train_bpe
from stages._common import log, repo_root, run_stage

CORPUS, OUT = "data/corpus", "data/tokenizer"


def training_texts(cfg, corpus):
    texts = read_texts(corpus, "train")
    if cfg.include_sft:
        texts += [m["content"] for c in read_conversations(corpus, "train") for m in c["messages"]]
    if cfg.max_train_bytes is not None:
        kept, size = [], 0
        for t in texts:
            size += len(t.encode("utf-8"))
            if size > cfg.max_train_bytes:
                break
            kept.append(t)
        texts = kept
    return texts


def body(cfgs, tracker):
    cfg, root = cfgs["tokenizer"], repo_root()
    texts = training_texts(cfg, root / CORPUS)
    start = time.perf_counter()
    tok = LLMTokenizer(train_bpe(texts, cfg.vocab_size, cfg.min_frequency, cfg.split_digits))
    seconds = time.perf_counter() - start
    tok.save(root / OUT)
    bpt = bytes_per_token(tok, read_texts(root / CORPUS, "val"))
    log(f"tokenizer: vocab {tok.vocab_size}, {bpt:.3f} bytes/token on val, trained in {seconds:.1f}s")
    tracker.log_artifact(root / OUT, "tokenizer")
    return {"tokenizer/vocab_size": tok.vocab_size, "tokenizer/bytes_per_token_val": round(bpt, 4),
            "tokenizer/train_texts": len(texts), "tokenizer/train_seconds": round(seconds, 3)}


def main() -> None:
    run_stage("tokenizer", ["base", "tokenizer"], body)


if __name__ == "__main__":
    main()
