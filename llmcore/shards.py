"""Token rows in Arrow shards, and a memory-mapped, resumable, rank-aware loader.

Pretraining rows: documents are joined into one stream with ``<|endoftext|>`` after each, and
the stream is cut into rows of ``seq_len + 1`` tokens with a stride of ``seq_len``: consecutive
rows share one token, so every next-token transition of the stream is a training target exactly
once, and nothing is padded. The only loss is the tail shorter than a row (reported as the
cropped fraction). Rows cross document boundaries, as in GPT-2 and nanoGPT; the model learns
to reset at ``<|endoftext|>``. Best-fit packing (rows starting at document starts) would avoid
attending across documents, at the cost of padding or cropping a few percent of tokens and a
bin-packing pass; on a corpus of ~1k short documents the simple stream wastes less.

SFT rows: conversations rendered with the chat template, carrying a ``loss_mask`` that is 1
exactly on assistant reply tokens and their closing ``<|im_end|>``. By default whole
conversations are packed into a row while they fit and the rest is padded with ``<|pad|>``;
short chat turns padded one per row would waste most of the compute (77% padding on the
builtin set at seq_len 256, 17% with next-fit packing). The price: a conversation can attend to the ones
before it in its row; each starts with ``<|im_start|>``, and no loss is taken on user turns,
so the model learns to ignore that context. ``pack.sft_packing: false`` gives one
conversation per row. Too long conversations are truncated or dropped (counted).

Storage: Arrow IPC files, one record batch per shard, token ids in a fixed-size list column
(``uint16`` when the vocabulary fits, else ``uint32``), so a shard memory-maps straight into a
``(rows, seq_len + 1)`` NumPy view with no copy and no parse. ``manifest.json`` records rows,
tokens, dtype, the tokenizer hash and each shard's SHA-256.

Loading: :class:`ShardDataset` maps the shards of one split; :class:`ShardLoader` draws global
batches from a permutation seeded by ``(seed, epoch)``, gives rank ``r`` of ``W`` the ``r``-th
slice of each global batch (so ``W`` ranks see exactly the batches one process would see at the
same global batch size), and saves/restores its position as two integers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from llmcore.config import UserError
from llmcore.files import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: SFT rows carry a segment column


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


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

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


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


def sft_rows(encoded: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int,
             overflow: str, stats: PackStats, packed: bool = False
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, mask, segment) rows of ``seq_len + 1`` tokens from encoded conversations.

    ``packed=False``: one conversation per row, padded. ``packed=True``: whole conversations
    are appended to the current row while they fit (next-fit), then the row is padded; a
    conversation never straddles two rows. Too long ones are truncated or dropped either way.
    ``segment`` numbers the conversations of a row (the padding after them is one more), so
    that a document-masked model keeps them apart.
    """
    row_len = seq_len + 1
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    cur_seg: list[int] = []

    def emit() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = np.full(row_len, pad_id, dtype=np.int64)
        m = np.zeros(row_len, dtype=np.uint8)
        seg = np.full(row_len, (cur_seg[-1] + 1) if cur_seg else 0, dtype=np.int64)
        row[: len(cur_ids)] = cur_ids
        m[: len(cur_mask)] = cur_mask
        seg[: len(cur_seg)] = cur_seg
        stats.rows += 1
        stats.tokens += len(cur_ids)
        stats.padded_tokens += row_len - len(cur_ids)
        stats.target_tokens += int(m[1:].sum())
        return row, m, seg

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
        if cur_ids and (not packed or len(cur_ids) + len(ids) > row_len):
            yield emit()
            cur_ids, cur_mask, cur_seg = [], [], []
        cur_seg.extend([cur_seg[-1] + 1 if cur_seg else 0] * len(ids))
        cur_ids.extend(ids)
        cur_mask.extend(mask)
    if cur_ids:
        yield emit()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Accumulate rows and write them as Arrow IPC shard files of ``rows_per_shard`` rows.

    Columns: ``input_ids`` (the token dtype), and for SFT rows ``loss_mask`` (uint8) and
    ``segment`` (uint16: which conversation of the row a token belongs to).
    """

    def __init__(self, out_dir: Path, split: str, row_len: int, dtype: np.dtype,
                 rows_per_shard: int, with_mask: bool) -> None:
        self.out_dir, self.split, self.row_len = Path(out_dir), split, row_len
        self.rows_per_shard, self.with_mask = rows_per_shard, with_mask
        self.dtypes = {"input_ids": np.dtype(dtype)}
        if with_mask:
            self.dtypes.update(loss_mask=np.dtype(np.uint8), segment=np.dtype(np.uint16))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._blocks: dict[str, list[np.ndarray]] = {c: [] for c in self.dtypes}
        self._pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None,
            segment: np.ndarray | None = None) -> None:
        """Add one row ``(row_len,)`` or a block of rows ``(n, row_len)``."""
        ids = ids.reshape(-1, ids.shape[-1])
        if ids.shape[1] != self.row_len:
            raise ValueError(f"rows have length {ids.shape[1]}, expected {self.row_len}")
        limit = np.iinfo(self.dtypes["input_ids"]).max
        if ids.size and int(ids.max()) > limit:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtypes['input_ids']}")
        cols = {"input_ids": ids}
        if self.with_mask:
            assert mask is not None and segment is not None
            cols.update(loss_mask=mask.reshape(ids.shape), segment=segment.reshape(ids.shape))
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, self.rows_per_shard - self._pending)
            for name, values in cols.items():
                self._blocks[name].append(values[start : start + take].astype(self.dtypes[name]))
            self._pending += take
            start += take
            if self._pending >= self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        n = self._pending
        cols = {name: pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(blocks).ravel(), type=pa.from_numpy_dtype(self.dtypes[name])),
            self.row_len) for name, blocks in self._blocks.items()}
        batch = pa.RecordBatch.from_pydict(cols)
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        path = self.out_dir / name
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        self.shards.append({"file": name, "rows": n, "sha256": sha256_file(path)})
        self._blocks = {c: [] for c in self.dtypes}
        self._pending = 0

    def close(self) -> dict[str, Any]:
        self.flush()
        return {"shards": self.shards, "rows": sum(s["rows"] for s in self.shards),
                "row_len": self.row_len, "has_loss_mask": self.with_mask,
                "has_segments": self.with_mask}


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def pack_split(out_dir: Path, split: str, rows: Iterable[Any], row_len: int, dtype: np.dtype,
               rows_per_shard: int, with_mask: bool) -> dict[str, Any]:
    writer = ShardWriter(out_dir, split, row_len, dtype, rows_per_shard, with_mask)
    for row in rows:
        if with_mask:
            writer.add(*row)
        else:
            writer.add(row)
    return writer.close()


def pack_all(tokenizer: Any, pretrain: dict[str, list[str]], sft: dict[str, list[list[dict]]],
             out_dir: Path, seq_len: int, rows_per_shard: int = 4096,
             sft_overflow: str = "truncate", batch_documents: int = 256,
             sft_packed: bool = True, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode and pack every split; write shards and ``manifest.json`` into ``out_dir``.

    ``pretrain`` maps split -> texts, ``sft`` maps split -> conversations (lists of messages).
    ``progress`` is called with the number of documents/conversations just encoded.
    """
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    splits: dict[str, Any] = {}
    stats: dict[str, PackStats] = {}

    def encoded_docs(texts: list[str]) -> Iterator[list[list[int]]]:
        for chunk in chunked(texts, batch_documents):
            yield tokenizer.encode_batch(chunk)
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
        rows = pretrain_rows(encoded_docs(texts), seq_len, tokenizer.eot_id, st)
        splits[name] = pack_split(out_dir, name, rows, seq_len + 1, dtype, rows_per_shard, False)
    for split, convs in sft.items():
        name = f"sft_{split}"
        st = stats[name] = PackStats()
        rows = sft_rows(encoded_convs(convs), seq_len, tokenizer.pad_id, sft_overflow, st,
                        packed=sft_packed)
        splits[name] = pack_split(out_dir, name, rows, seq_len + 1, dtype, rows_per_shard, True)
    seconds = time.perf_counter() - start
    for name, st in stats.items():
        splits[name].update(st.as_dict())
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256(),
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "loss_mask": "loss_mask[i] == 1 iff token i is an assistant reply token to predict",
        "splits": splits,
        "seconds": round(seconds, 3),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ShardError(UserError):
    """A shard directory cannot be read; the message names the file and says what to do."""


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {shard_dir} is not a shard directory; run "
                         "`dvc repro pack`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); run `dvc repro pack`") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: shard format {version} is not {FORMAT_VERSION}; run "
                         "`dvc repro pack`")
    return manifest


class ShardDataset:
    """The rows of one split, memory-mapped; ``ds[i]`` is a zero-copy NumPy view."""

    def __init__(self, shard_dir: Path, split: str) -> None:
        self.dir = Path(shard_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest.get("splits", {}):
            raise ShardError(f"split {split!r} not in {self.dir / MANIFEST} (has "
                             f"{', '.join(self.manifest.get('splits', {}))}); run `dvc repro "
                             "pack`")
        info = self.manifest["splits"][split]
        self.split, self.row_len = split, info["row_len"]
        self.has_loss_mask = bool(info["has_loss_mask"])
        self.has_segments = bool(info.get("has_segments"))
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eot_id = int(self.manifest["eot_id"])
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._segs: list[np.ndarray] = []
        self._maps = []  # the memory maps must outlive the NumPy views into them
        for shard in info["shards"]:
            path = self.dir / shard["file"]
            try:
                source = pa.memory_map(str(path), "r")
                table = pa.ipc.open_file(source).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise ShardError(f"{path} is missing or unreadable ({exc}); run `dvc repro "
                                 "pack`") from None
            self._maps.append(source)
            if table.num_rows != shard["rows"]:
                raise ShardError(f"{path}: {table.num_rows} rows, the manifest says "
                                 f"{shard['rows']}; run `dvc repro pack`")
            self._ids.append(self._view(table, "input_ids"))
            if self.has_loss_mask:
                self._masks.append(self._view(table, "loss_mask"))
            if self.has_segments:
                self._segs.append(self._view(table, "segment"))
        sizes = [len(a) for a in self._ids]
        self._offsets = np.cumsum([0] + sizes)
        self.num_rows = int(self._offsets[-1])

    def _view(self, table: pa.Table, column: str) -> np.ndarray:
        col = table.column(column)
        assert col.num_chunks == 1, "one record batch per shard"
        flat = col.chunk(0).values.to_numpy(zero_copy_only=True)
        return flat.reshape(-1, self.row_len)

    def __len__(self) -> int:
        return self.num_rows

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return s, i - int(self._offsets[s])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        s, j = self._locate(i)
        return self._ids[s][j], (self._masks[s][j] if self.has_loss_mask else None)

    def _take(self, blocks: list[np.ndarray], indices: Sequence[int], dtype: Any) -> np.ndarray:
        """Rows at ``indices`` of one column as one ``(n, row_len)`` array (its only copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.row_len), dtype=dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = blocks[s][idx[sel] - self._offsets[s]]
        return out

    def gather(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids and loss mask (None for pretraining rows) of the rows at ``indices``."""
        ids = self._take(self._ids, indices, self.dtype)
        masks = self._take(self._masks, indices, np.uint8) if self.has_loss_mask else None
        return ids, masks

    def segments(self, indices: Sequence[int], ids: np.ndarray) -> np.ndarray:
        """The document number of each token of the rows at ``indices`` (``ids`` are theirs):
        stored for SFT rows, counted from ``<|endoftext|>`` for pretraining rows."""
        if self.has_segments:
            return self._take(self._segs, indices, np.int64)
        return eot_segments(ids, self.eot_id)


def eot_segments(ids: np.ndarray, eot_id: int) -> np.ndarray:
    """(n, L) ids -> (n, L) document numbers; each ``<|endoftext|>`` starts a document.

    The separator opens the next document rather than closing the last: the model then reads
    it as a beginning-of-document token, the one context a first token is predicted from.
    """
    return np.cumsum(ids == eot_id, axis=1)


@dataclass
class Batch:
    """``input_ids`` and ``targets`` are (B, T) int64; ``loss_mask`` (B, T) float32;
    ``segments`` (B, T) int64, the document of each input token (for document masking)."""

    input_ids: Any
    targets: Any
    loss_mask: Any
    segments: Any = None


@dataclass
class LoaderState:
    epoch: int = 0
    step: int = 0  # global batches already served in this epoch


class ShardLoader:
    """Deterministic batches over a :class:`ShardDataset`, resumable, strided by rank.

    A global batch is ``batch_size * world_size`` rows taken in order from a permutation of the
    rows drawn from ``(seed, epoch)``; rank ``r`` gets rows ``[r*batch_size, (r+1)*batch_size)``
    of it. The last incomplete global batch of an epoch is dropped, so every rank takes the same
    number of steps. Iterating never ends; ``epoch`` and ``step`` say where it is.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.ds, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"split {dataset.split!r} has {len(dataset)} rows, fewer than one global batch "
                f"({batch_size} x {world_size} ranks): lower the batch size or add data"
            )
        self.state = LoaderState()
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.ds)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                          if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Row indices this rank reads for global batch ``step`` of ``epoch``."""
        start = step * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "step": self.state.step, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, "
                                 f"this loader has {key}={getattr(self, key)}")
        self.state = LoaderState(int(state["epoch"]), int(state["step"]))

    def next_batch(self) -> Batch:
        import torch

        if self.state.step >= self.steps_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        idx = self.indices(self.state.epoch, self.state.step)
        ids, masks = self.ds.gather(idx)
        segments = torch.from_numpy(self.ds.segments(idx, ids)[:, :-1].astype(np.int64))
        self.state.step += 1
        rows = torch.from_numpy(ids.astype(np.int64))
        if masks is None:
            loss_mask = torch.ones(rows.shape[0], rows.shape[1] - 1, dtype=torch.float32)
        else:
            loss_mask = torch.from_numpy(masks[:, 1:].astype(np.float32))
        return Batch(rows[:, :-1], rows[:, 1:], loss_mask, segments)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()
