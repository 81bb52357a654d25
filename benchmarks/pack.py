"""Packing throughput against raw ``Tokenizer.encode_batch`` on the same text.

Prints JSON: tokens/s of ``pack_all`` (encode + pack + write shards) and of a bare
``encode_batch`` over the same documents, and their ratio (1.0 = packing costs nothing beyond
encoding). Uses ``data/corpus`` and ``data/tokenizer`` when they exist (after ``dvc repro
tokenizer``), otherwise builds the builtin corpus and a tokenizer in a temporary folder.

    python benchmarks/pack.py [--seq-len 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llmcore.config.fetch import FetchConfig
from llmcore.data.corpus import read_conversations, read_texts
from llmcore.data.fetch import build_corpus
from llmcore.data.packing import pack_all
from llmcore.data.tokenizer import LLMTokenizer, render_chat, train_bpe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=6400)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    corpus, tokdir = Path("data/corpus"), Path("data/tokenizer")
    if not (corpus / "manifest.json").is_file():
        corpus = work / "corpus"
        build_corpus(FetchConfig(), corpus)
    texts = read_texts(corpus, "train")
    convs = [c["messages"] for c in read_conversations(corpus, "train")]
    if (tokdir / "tokenizer.json").is_file():
        tok = LLMTokenizer.load(tokdir)
    else:
        tok = LLMTokenizer(train_bpe(texts, args.vocab_size))

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    raw_s = best(lambda: tok.encode_batch(texts))
    pack_s = best(lambda: pack_all(tok, {"train": texts}, {}, work / "shards", args.seq_len))
    n_chat = sum(len(ids) for ids, _ in tok.encode_chat_batch(convs))
    rendered = [render_chat(c) for c in convs]
    chat_same_s = best(lambda: tok.tok.encode_batch(rendered, add_special_tokens=False))
    chat_raw_s = best(lambda: tok.tok.encode_batch(
        [''.join(m["content"] for m in c) for c in convs]))
    chat_pack_s = best(lambda: pack_all(tok, {}, {"train": convs}, work / "sft", args.seq_len))
    result = {
        "cpus": os.cpu_count(),
        "documents": len(texts),
        "tokens": n_tokens,
        "encode_batch_tokens_per_s": round(n_tokens / raw_s),
        "pack_tokens_per_s": round(n_tokens / pack_s),
        "pack_ratio": round((n_tokens / pack_s) / (n_tokens / raw_s), 3),
        "sft_conversations": len(convs),
        "sft_tokens": n_chat,
        "sft_pack_tokens_per_s": round(n_chat / chat_pack_s),
        # the same text: the conversations rendered with the chat template, encoded plainly
        "sft_pack_ratio_vs_encode_of_same_text": round(chat_same_s / chat_pack_s, 3),
        # the message contents alone (fewer tokens: no headers, no special tokens)
        "sft_pack_ratio_vs_plain_encode": round(chat_raw_s / chat_pack_s, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
