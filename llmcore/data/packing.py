"""Packing: what goes into the token rows of the shards (:mod:`llmcore.data.shards` writes them).

Pretraining rows: documents are joined into one stream with ``<|endoftext|>`` after each, and
the stream is cut into rows of ``seq_len + 1`` tokens with a stride of ``seq_len``: consecutive
rows share one token, so every next-token transition of the stream is a training target exactly
once, and nothing is padded. The only loss is the tail shorter than a row (reported as the
cropped fraction). Rows cross document boundaries; a model with ``doc_mask`` keeps the
documents of a row apart (the ``<|endoftext|>`` tokens mark them), one without learns to reset
at ``<|endoftext|>``, as GPT-2 and nanoGPT do.

Chat mix (``pack.pretrain_chat_share``): a share of the pretraining training stream can be SFT
training conversations rendered with the chat template, each a document of its own. The
checkable tasks need many more examples than SFT's few hundred steps show them, and the
documents alone are repeated several times over in the default run, so pretraining steps
spent on the tasks cost little held-out bpb (nanochat's mid-training phase does the same,
later). The conversations are chosen by a fixed seeded draw; the validation split stays
documents only, so its bpb stays comparable with and without the mix.

SFT rows: conversations rendered with the chat template, carrying a ``loss_mask`` that is 1
exactly on assistant reply tokens and their closing ``<|im_end|>``. By default whole
conversations are packed into a row while they fit and the rest is padded with ``<|pad|>``;
short chat turns padded one per row would waste most of the compute (77% padding on the
builtin set at seq_len 256, 2.5% with first-fit packing). A ``segment`` column numbers the
conversations of a row so that a document-masked model keeps them apart.
``pack.sft_packing: false`` gives one conversation per row. Too long conversations are
truncated or dropped (counted).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from llmcore.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    PackCounts,
    ShardWriter,
    SplitManifest,
    SplitShards,
    token_dtype,
)
from llmcore.data.tokenizer import LLMTokenizer

T = TypeVar("T")


@dataclass
class PackStats:
    rows: int = 0
    tokens: int = 0  # tokens written into rows (pretrain: stream tokens kept; SFT: real tokens)
    source_tokens: int = 0  # tokens produced by the tokenizer
    cropped_tokens: int = 0  # produced but not written (tail / truncated / dropped)
    padded_tokens: int = 0  # pad tokens written (SFT)
    conversations: int = 0  # SFT conversations read
    dropped_rows: int = 0  # SFT conversations dropped for length
    truncated_rows: int = 0  # SFT conversations truncated
    target_tokens: int = 0  # tokens with loss_mask 1 (SFT)
    doc_tokens: int = 0  # pretrain: document tokens produced (with their end-of-text)
    chat_tokens: int = 0  # pretrain: conversation tokens mixed in (chat mix)
    chat_conversations: int = 0  # pretrain: conversations mixed in

    def as_dict(self) -> PackCounts:
        # the fields above are PackCounts' keys, in its order
        return cast(PackCounts, dict(self.__dict__))


def pretrain_rows(token_chunks: Iterable[Sequence[Sequence[int]]], seq_len: int, eot_id: int,
                  stats: PackStats) -> Iterator[np.ndarray]:
    """Blocks of rows ``(n, seq_len + 1)``, stride ``seq_len``, from documents joined by EOT.

    ``token_chunks`` yields lists of encoded documents (one ``encode_batch`` result each); the
    rows are cut with NumPy so that packing adds little to the cost of encoding.
    """
    row_len = seq_len + 1
    carry = np.empty(0, dtype=np.int64)
    for docs in token_chunks:
        n = sum(len(d) + 1 for d in docs)
        flat = np.fromiter(chain.from_iterable(chain(d, (eot_id,)) for d in docs),
                           dtype=np.int64, count=n)
        stats.source_tokens += n
        stream = np.concatenate([carry, flat])
        n_rows = max(0, (len(stream) - 1) // seq_len)
        if n_rows:
            windows = np.lib.stride_tricks.sliding_window_view(stream, row_len)
            yield np.ascontiguousarray(windows[::seq_len][:n_rows])
            stats.rows += n_rows
            carry = stream[n_rows * seq_len :]  # the last row's final token starts the next
        else:
            carry = stream
    stats.tokens = stats.rows * seq_len + (1 if stats.rows else 0)
    stats.cropped_tokens = stats.source_tokens - stats.tokens


OPEN_ROWS = 8  # SFT packing: rows a conversation may join (first fit); 2.5% padding vs 14%


@dataclass
class _Row:
    ids: list[int]
    mask: list[int]
    seg: list[int]


def sft_rows(encoded: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int,
             overflow: str, stats: PackStats, packed: bool = False
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, mask, segment) rows of ``seq_len + 1`` tokens from encoded conversations.

    ``packed=False``: one conversation per row, padded. ``packed=True``: each conversation
    joins the first of up to ``OPEN_ROWS`` open rows it fits in (first fit); one that fits
    none opens a row, and when ``OPEN_ROWS`` are open the fullest is padded and written first.
    Next fit (one open row) pads 14% of the builtin SFT rows at seq_len 256, first fit over
    eight 2.5%: an SFT step of fixed rows then holds 13% more conversations. The window keeps
    the conversations in about the order they come (a seeded shuffle) with bounded memory.
    A conversation never straddles two rows. Too long ones are truncated or dropped either
    way. ``segment`` numbers the conversations of a row (the padding after them is one
    more), so that a document-masked model keeps them apart.
    """
    row_len = seq_len + 1
    open_rows: list[_Row] = []
    room = OPEN_ROWS if packed else 1

    def emit(row: _Row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.full(row_len, pad_id, dtype=np.int64)
        m = np.zeros(row_len, dtype=np.uint8)
        seg = np.full(row_len, row.seg[-1] + 1, dtype=np.int64)
        ids[: len(row.ids)] = row.ids
        m[: len(row.mask)] = row.mask
        seg[: len(row.seg)] = row.seg
        stats.rows += 1
        stats.tokens += len(row.ids)
        stats.padded_tokens += row_len - len(row.ids)
        stats.target_tokens += int(m[1:].sum())
        return ids, m, seg

    for ids, mask in encoded:
        stats.source_tokens += len(ids)
        stats.conversations += 1
        if len(ids) > row_len:
            if overflow == "drop":
                stats.dropped_rows += 1
                stats.cropped_tokens += len(ids)
                continue
            stats.truncated_rows += 1
            stats.cropped_tokens += len(ids) - row_len
            ids, mask = ids[:row_len], mask[:row_len]
        if not any(mask[1:]):  # nothing left to learn from (reply cut off entirely)
            stats.dropped_rows += 1
            stats.cropped_tokens += len(ids)
            continue
        row = next((r for r in open_rows if packed and len(r.ids) + len(ids) <= row_len), None)
        if row is None:
            if len(open_rows) == room:
                fullest = max(range(room), key=lambda i: len(open_rows[i].ids))
                yield emit(open_rows.pop(fullest))
            row = _Row([], [], [])
            open_rows.append(row)
        row.seg.extend([row.seg[-1] + 1 if row.seg else 0] * len(ids))
        row.ids.extend(ids)
        row.mask.extend(mask)
    for row in open_rows:
        yield emit(row)


class PackedManifest(Manifest):
    """What :func:`pack_all` returns: the manifest it wrote, and how long packing took."""

    seconds: float


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def pack_split(out_dir: Path, split: str, rows: Iterable[Any], row_len: int, dtype: np.dtype,
               rows_per_shard: int, with_mask: bool) -> SplitShards:
    """``rows``: blocks of token rows, or with ``with_mask`` (ids, mask, segment) rows."""
    writer = ShardWriter(out_dir, split, row_len, dtype, rows_per_shard, with_mask)
    for row in rows:
        if with_mask:
            writer.add(*row)
        else:
            writer.add(row)
    return writer.close()


def chat_quota(doc_tokens: int, share: float) -> int:
    """Conversation tokens that make up ``share`` of a stream holding ``doc_tokens`` others."""
    return int(round(doc_tokens * share / (1.0 - share))) if share > 0 else 0


def chat_documents(tokenizer: LLMTokenizer, convs: list[list[dict]], share: float, seed: int,
                   batch: int, st: PackStats) -> Iterator[list[list[int]]]:
    """Encoded conversations, drawn in a seeded order, as pretraining documents, until they
    make up ``share`` of the stream with the documents counted in ``st`` so far."""
    quota = chat_quota(st.doc_tokens, share)
    order = np.random.default_rng(seed).permutation(len(convs))
    for chunk in chunked(order.tolist(), batch):
        if st.chat_tokens >= quota:
            return
        docs = []
        for ids, _ in tokenizer.encode_chat_batch([convs[i] for i in chunk]):
            if st.chat_tokens >= quota:
                break
            docs.append(ids)
            st.chat_tokens += len(ids) + 1
            st.chat_conversations += 1
        yield docs


def pack_all(tokenizer: LLMTokenizer, pretrain: dict[str, list[str]], sft: dict[str, list[list[dict]]],
             out_dir: Path, seq_len: int, rows_per_shard: int = 4096,
             sft_overflow: str = "truncate", batch_documents: int = 256,
             sft_packed: bool = True, progress: Callable[[int], None] | None = None,
             chat_share: float = 0.0, seed: int = 0) -> PackedManifest:
    """Encode and pack every split; write shards and ``manifest.json`` into ``out_dir``.

    ``pretrain`` maps split -> texts, ``sft`` maps split -> conversations (lists of messages).
    ``chat_share``: that share of the pretraining *train* stream is SFT train conversations
    (a draw seeded by ``seed``; fewer when they run out). The SFT train conversations are
    packed in an order seeded by ``seed``. ``progress`` is called with the
    number of documents/conversations just encoded.
    """
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    shards: dict[str, SplitShards] = {}
    stats: dict[str, PackStats] = {}

    def encoded_docs(texts: list[str], st: PackStats) -> Iterator[list[list[int]]]:
        for chunk in chunked(texts, batch_documents):
            docs = tokenizer.encode_batch(chunk)
            st.doc_tokens += sum(len(d) + 1 for d in docs)
            yield docs
            if progress:
                progress(len(chunk))

    def encoded_convs(convs: list[list[dict]]) -> Iterator[tuple[list[int], list[int]]]:
        for chunk in chunked(convs, batch_documents):
            yield from tokenizer.encode_chat_batch(chunk)
            if progress:
                progress(len(chunk))

    for split, texts in pretrain.items():
        name = f"pretrain_{split}"
        st = stats[name] = PackStats()
        chunks: Iterable[list[list[int]]] = encoded_docs(texts, st)
        if split == "train" and chat_share > 0 and sft.get("train"):
            chunks = chain(chunks, chat_documents(tokenizer, sft["train"], chat_share, seed,
                                                  batch_documents, st))
        rows = pretrain_rows(chunks, seq_len, tokenizer.eot_id, st)
        shards[name] = pack_split(out_dir, name, rows, seq_len + 1, dtype, rows_per_shard, False)
    for split, convs in sft.items():
        name = f"sft_{split}"
        st = stats[name] = PackStats()
        if split == "train":
            # in a seeded order: the corpus stores conversations by content hash, so the
            # repeats of a synthetic question (drawn with replacement) lie side by side and
            # would fill a row with copies of one question
            convs = [convs[i] for i in np.random.default_rng(seed).permutation(len(convs))]
        sft_split = sft_rows(encoded_convs(convs), seq_len, tokenizer.pad_id, sft_overflow, st,
                             packed=sft_packed)
        shards[name] = pack_split(out_dir, name, sft_split, seq_len + 1, dtype, rows_per_shard,
                                  True)
    splits: dict[str, SplitManifest] = {name: {**shards[name], **st.as_dict()}
                                        for name, st in stats.items()}
    manifest = write_manifest(out_dir, tokenizer, seq_len, dtype, chat_share, splits)
    return {**manifest, "seconds": round(time.perf_counter() - start, 3)}


def write_manifest(out_dir: Path, tokenizer: LLMTokenizer, seq_len: int, dtype: np.dtype,
                   chat_share: float, splits: dict[str, SplitManifest]) -> Manifest:
    """``manifest.json``. It holds no timing: identical rows must give an identical shard
    directory, or DVC would see new data (and retrain everything) whenever packing re-runs."""
    manifest: Manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256(),
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "loss_mask": "loss_mask[i] == 1 iff token i is an assistant reply token to predict",
        "pretrain_chat_share": chat_share,
        "splits": splits,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
