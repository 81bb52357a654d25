"""Token rows in Arrow shards, and a memory-mapped, resumable, rank-aware loader.

What goes into the rows is decided by :mod:`llmcore.data.packing`; this module owns the format.
Arrow IPC files, one record batch per shard, token ids in a fixed-size list column (``uint16``
when the vocabulary fits, else ``uint32``), so a shard memory-maps straight into a
``(rows, seq_len + 1)`` NumPy view with no copy and no parse. SFT rows add ``loss_mask`` and
``segment`` columns. ``manifest.json`` records rows, tokens, dtype, the tokenizer hash and
each shard's SHA-256.

Loading: :class:`ShardDataset` maps the shards of one split; :class:`ShardLoader` draws global
batches from a permutation seeded by ``(seed, epoch)``, gives rank ``r`` of ``W`` the ``r``-th
slice of each global batch (so ``W`` ranks see exactly the batches one process would see at the
same global batch size), and saves/restores its position as two integers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa

from llmcore.files import sha256_file
from llmcore.schema import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: SFT rows carry a segment column


class ShardFile(TypedDict):
    """One shard file of a split, as the manifest lists it."""

    file: str
    rows: int
    sha256: str


class SplitShards(TypedDict):
    """What :meth:`ShardWriter.close` says of the split it wrote."""

    shards: list[ShardFile]
    rows: int
    row_len: int
    has_loss_mask: bool
    has_segments: bool


class PackCounts(TypedDict):
    """The counts of packing one split (``llmcore.data.packing.PackStats.as_dict``)."""

    rows: int
    tokens: int
    source_tokens: int
    cropped_tokens: int
    padded_tokens: int
    conversations: int
    dropped_rows: int
    truncated_rows: int
    target_tokens: int
    doc_tokens: int
    chat_tokens: int
    chat_conversations: int


class SplitManifest(SplitShards, PackCounts):
    """A split's entry of ``manifest.json``: its shards and its packing counts (``rows`` is in
    both and the same number)."""


class Manifest(TypedDict):
    """``manifest.json`` (written by ``llmcore.data.packing.write_manifest``)."""

    format_version: int
    seq_len: int
    row_len: int
    dtype: str  # a NumPy dtype name
    vocab_size: int
    tokenizer_sha256: str
    eot_id: int
    pad_id: int
    loss_mask: str  # what the loss_mask column means, in words
    pretrain_chat_share: float
    splits: dict[str, SplitManifest]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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
        self.shards: list[ShardFile] = []

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

    def close(self) -> SplitShards:
        self.flush()
        return {"shards": self.shards, "rows": sum(s["rows"] for s in self.shards),
                "row_len": self.row_len, "has_loss_mask": self.with_mask,
                "has_segments": self.with_mask}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ShardError(UserError):
    """A shard directory cannot be read; the message names the file and says what to do."""


def read_manifest(shard_dir: Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {shard_dir} is not a shard directory; run "
                         "`dvc repro pack`")
    try:
        manifest: Manifest = json.loads(path.read_text())  # checked below: the format version
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

    def _take(self, blocks: list[np.ndarray], indices: Sequence[int] | np.ndarray, dtype: Any
              ) -> np.ndarray:
        """Rows at ``indices`` of one column as one ``(n, row_len)`` array (its only copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = np.empty((len(idx), self.row_len), dtype=dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = blocks[s][idx[sel] - self._offsets[s]]
        return out

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids and loss mask (None for pretraining rows) of the rows at ``indices``."""
        ids = self._take(self._ids, indices, self.dtype)
        masks = self._take(self._masks, indices, np.uint8) if self.has_loss_mask else None
        return ids, masks

    def subset(self, rows: Sequence[int] | np.ndarray) -> RowSubset:
        """These rows alone, in this order, as a dataset."""
        return RowSubset(self, rows)

    def segments(self, indices: Sequence[int] | np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The document number of each token of the rows at ``indices`` (``ids`` are theirs):
        stored for SFT rows, counted from ``<|endoftext|>`` for pretraining rows."""
        if self.has_segments:
            return self._take(self._segs, indices, np.int64)
        return eot_segments(ids, self.eot_id)


class RowSubset:
    """Some rows of a :class:`ShardDataset`, read as a dataset of their own (what held-out
    scoring of a chosen subset needs: ``len``, ``gather``, ``segments``, ``eot_id``)."""

    def __init__(self, dataset: ShardDataset, rows: Sequence[int] | np.ndarray) -> None:
        self.dataset, self.rows = dataset, np.asarray(rows, dtype=np.int64)
        self.row_len, self.eot_id = dataset.row_len, dataset.eot_id
        if len(self.rows) and not (0 <= self.rows.min() and self.rows.max() < len(dataset)):
            raise IndexError(f"rows out of range [0, {len(dataset)})")

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.dataset.gather(self.rows[np.asarray(indices, dtype=np.int64)])

    def segments(self, indices: Sequence[int] | np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.dataset.segments(self.rows[np.asarray(indices, dtype=np.int64)], ids)


class DataFingerprint(TypedDict):
    """What of the shards a run depends on (:func:`data_fingerprint`)."""

    tokenizer: str  # the tokenizer's SHA-256
    seq_len: int
    shards: dict[str, list[str]]  # split -> the SHA-256 of each of its shards


def data_fingerprint(manifest: Manifest, splits: list[str]) -> DataFingerprint:
    """What of the shards a training run's numbers depend on (its checkpoints' fingerprint):
    the tokenizer, the row length and the hash of every shard of ``splits``."""
    return {"tokenizer": manifest["tokenizer_sha256"], "seq_len": manifest["seq_len"],
            "shards": {s: [x["sha256"] for x in manifest["splits"][s]["shards"]]
                       for s in splits if s in manifest["splits"]}}


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
        """Continue where ``state`` was; at another world size too when the global batch is
        the same (a step reads the same rows, split among other ranks)."""
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']}, "
                             f"this loader has seed={self.seed}")
        saved = int(state.get("batch_size", self.batch_size)) * int(
            state.get("world_size", self.world_size))
        if saved != self.global_batch:
            raise ValueError(f"loader state was saved with a global batch of {saved} rows "
                             f"({state.get('batch_size')} x {state.get('world_size')} ranks), "
                             f"this loader has {self.batch_size} x {self.world_size}")
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
