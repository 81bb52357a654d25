"""Corpus sources, cleaning and splitting: what the fetch stage runs.

Sources
  * ``builtin`` (offline default, :mod:`llmcore.data.pydocs`): Python's own documentation.
  * ``files``: ``.txt``/``.md`` (one document per file), ``.jsonl`` (``{"text": ...}``, or
    ``{"conversations": [...]}`` as MiniMind writes it, or ``{"messages": [...]}`` as Hugging Face
    chat sets do; ShareGPT's ``from``/``value`` keys are accepted too) and ``.parquet`` with the
    same columns.
  * ``hf``: a Hugging Face dataset streamed with ``datasets`` (hub id, or a local folder).
  * ``preference_paths`` (any source): preference pairs for DPO, parsed by
    :mod:`llmcore.data.preferences` with this module's row reader, written to their own tables.

Cleaning drops empty documents, removes exact duplicates (by SHA-256 of the text, or of the
canonical JSON of a conversation) and applies document/byte limits. Malformed records are
skipped and counted, all of them listed in the corpus's ``bad_records.txt``; ``strict`` turns
them into errors.

The train/val/test split is decided by pool keys, never by filtering duplicates
(:mod:`llmcore.data.splits`): a document's group (a module or topic of the builtin corpus,
the content hash of a user document), merged with the groups it nearly copies; a doc
question follows its document; a synthetic question its word or operand pair; a user
conversation its content. Adding or removing a record never moves another one between
splits. The price: the shares are only approximately ``val_fraction`` / ``test_fraction`` on
small corpora. When the hash leaves train or val without rows and there are two or more
groups, the group nearest the split line crosses it, whole.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from llmcore.config import FetchConfig
from llmcore.data.corpus import (
    SPLITS,
    BadRecord,
    Conversation,
    CorpusError,
    Document,
    Record,
    unencodable,
)
from llmcore.data.pydocs import builtin_documents, doc_conversations, stdlib_code_documents
from llmcore.data.splits import assign_splits, merge_near_copies, pool_breach
from llmcore.data.tasks import synthetic_conversations

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "bot": "assistant"}
MAX_REPORTED = 5  # malformed records printed; all of them go to the corpus's bad_records.txt
MAX_LISTED = 100_000  # malformed records listed there (all are counted)


def content_hash(payload: Any) -> str:
    """SHA-256 of a string, or of the compact JSON of anything else (messages, pairs)."""
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def content_key(record: Record) -> str:
    return content_hash(record.text if isinstance(record, Document) else record.messages)


def parse_messages(raw: Any, location: str, need_assistant: bool = True
                   ) -> tuple[tuple[str, str], ...]:
    """``(role, content)`` pairs of a message list, or BadRecord naming the first problem."""
    if not isinstance(raw, list) or not raw:
        raise BadRecord(location, "messages must be a non-empty list")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRecord(location, f"message {i} is not an object")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise BadRecord(location, f"message {i} has role {role!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord(location, f"message {i} content must be a string")
        if role == "system" and i != 0:
            raise BadRecord(location, f"message {i}: a system message may only come first")
        out.append((role, content))
    if need_assistant and not any(r == "assistant" for r, _ in out):
        raise BadRecord(location, "conversation has no assistant message")
    return tuple(out)


def parse_record(row: Any, location: str, text_field: str, source: str) -> Record:
    """Turn one JSON-like row into a Document or a Conversation, or raise BadRecord."""
    if not isinstance(row, dict):
        raise BadRecord(location, f"expected a JSON object, got {type(row).__name__}")
    for key in ("conversations", "messages"):
        if row.get(key) is not None:
            msgs = parse_messages(row[key], location)
            task = str(row["task"]) if isinstance(row.get("task"), str) else "chat"
            answer = row.get("answer") if isinstance(row.get("answer"), str) else None
            return Conversation(msgs, source, task, answer)
    if text_field in row:
        text = row[text_field]
        if not isinstance(text, str):
            raise BadRecord(location, f"field {text_field!r} must be a string")
        return Document(text, source)
    raise BadRecord(
        location, f"record has none of the fields {text_field!r}, 'messages', 'conversations'"
    )


TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".parquet")  # files of records, read by read_rows
SUPPORTED = TEXT_SUFFIXES + ROW_SUFFIXES


def expand_paths(patterns: Iterable[str], root: Path | None = None, param: str = "fetch.paths",
                 suffixes: tuple[str, ...] = SUPPORTED) -> list[Path]:
    """Expand files/globs (relative to ``root``) into a sorted, de-duplicated file list of
    the given types; ``param`` is the params key that errors name."""
    root = root or Path.cwd()
    found: list[Path] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(root / pattern)
        matches = sorted(glob.glob(full, recursive=True))
        if not matches:
            raise CorpusError(f"{param}: {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.extend(sorted(q for q in p.rglob("*") if q.suffix in suffixes))
            elif p.suffix not in suffixes:
                raise CorpusError(
                    f"{param}: {m} has an unsupported type (use {', '.join(suffixes)})"
                )
            else:
                found.append(p)
    return list(dict.fromkeys(found))


def _decode(data: bytes, location: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(location, f"invalid UTF-8 at byte {exc.start}") from None


def _json_row(raw: bytes, location: str) -> Any:
    try:
        return json.loads(_decode(raw, location))
    except json.JSONDecodeError as exc:
        raise BadRecord(location, f"invalid JSON ({exc.msg})") from None


T = TypeVar("T")


def _encodable(row: Any, location: str) -> Any:
    """``row`` itself, or BadRecord if a string in it cannot be encoded as UTF-8."""
    bad = unencodable(row, "record")
    if bad is not None:
        raise BadRecord(location, str(bad))
    return row


def _parsed(parse: Callable[[Any, str], T], location: str, row: Any) -> T | BadRecord:
    """A ``.jsonl`` line (bytes) is decoded first; a Parquet row is a Python value already."""
    try:
        value = _json_row(row, location) if isinstance(row, bytes) else row
        return parse(_encodable(value, location), location)
    except BadRecord as bad:
        return bad


def read_rows(path: Path, parse: Callable[[Any, str], T]) -> Iterator[T | BadRecord]:
    """``parse(row, location)`` of every row of a ``.jsonl`` (one JSON value a line, blank
    lines skipped) or ``.parquet`` file, ``location`` being ``file:line`` or ``file:row i``.
    A row that cannot be decoded or parsed is yielded as its BadRecord, not raised."""
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    yield _parsed(parse, f"{path}:{lineno}", raw)
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            yield BadRecord(str(path), f"unreadable Parquet file ({exc})")
            return
        for i, row in enumerate(table.to_pylist()):
            yield _parsed(parse, f"{path}:row {i}", row)
    else:
        raise ValueError(f"{path}: read_rows reads {' and '.join(ROW_SUFFIXES)} files")


def read_file(path: Path, text_field: str) -> Iterator[Record | BadRecord]:
    """Records of one file; malformed ones are yielded as BadRecord instances, not raised."""
    source = f"file:{path}"
    if path.suffix in TEXT_SUFFIXES:
        try:
            yield Document(_decode(path.read_bytes(), str(path)), source)
        except BadRecord as bad:
            yield bad
    else:
        yield from read_rows(path, lambda row, loc: parse_record(row, loc, text_field, source))


HF_ENDPOINT_DEFAULT = "https://huggingface.co"


def hub_reachable(endpoint: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT", HF_ENDPOINT_DEFAULT))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port}: {exc}"


def read_hf(cfg: FetchConfig) -> Iterator[Record | BadRecord]:
    """Stream rows of a Hugging Face dataset (hub id or local folder)."""
    name = cfg.hf_dataset or ""
    local = Path(name).expanduser()
    if not local.exists():
        ok, why = hub_reachable()
        if not ok:
            raise CorpusError(
                f"fetch.hf_dataset: cannot reach the Hugging Face hub for {name!r} ({why}). "
                "Download the dataset where there is internet and set fetch.hf_dataset to its "
                "local folder, or use fetch.source: files."
            )
    import datasets  # heavy import, only for this source

    try:
        stream = datasets.load_dataset(
            str(local) if local.exists() else name,
            cfg.hf_config,
            split=cfg.hf_split,
            streaming=True,
        )
    except Exception as exc:  # datasets raises many unrelated types for "not found"
        raise CorpusError(
            f"fetch.hf_dataset: cannot load {name!r} (config {cfg.hf_config!r}, split "
            f"{cfg.hf_split!r}): {type(exc).__name__}: {exc}"
        ) from exc
    for i, row in enumerate(stream):
        try:
            location = f"hf:{name}:{i}"
            yield parse_record(_encodable(row, location), location, cfg.text_field, f"hf:{name}")
        except BadRecord as bad:
            yield bad


@dataclass
class CorpusStats:
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    conversations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    preference_pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    sft_tasks: Counter = field(default_factory=Counter)
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    sft_duplicates_dropped: int = 0
    preference_duplicates_dropped: int = 0
    bad_records: int = 0
    bad_listed: list[str] = field(default_factory=list)  # the first MAX_LISTED
    notes: list[str] = field(default_factory=list)  # what the user should know (small corpus)
    limit_dropped: int = 0
    held_out_dropped: int = 0  # training-only documents (code) of a held-out group
    seconds: float = 0.0

    def metrics(self, prefix: str = "fetch") -> dict[str, float]:
        m = {
            f"{prefix}/documents": sum(self.documents.values()),
            f"{prefix}/bytes": sum(self.bytes.values()),
            f"{prefix}/conversations": sum(self.conversations.values()),
            f"{prefix}/preference_pairs": sum(self.preference_pairs.values()),
            f"{prefix}/empty_dropped": self.empty_dropped,
            f"{prefix}/duplicates_dropped": (self.duplicates_dropped + self.sft_duplicates_dropped
                                             + self.preference_duplicates_dropped),
            f"{prefix}/bad_records": self.bad_records,
            f"{prefix}/limit_dropped": self.limit_dropped,
            f"{prefix}/held_out_dropped": self.held_out_dropped,
            f"{prefix}/seconds": round(self.seconds, 3),
        }
        for s in SPLITS:
            m[f"{prefix}/documents_{s}"] = self.documents[s]
            m[f"{prefix}/bytes_{s}"] = self.bytes[s]
            m[f"{prefix}/conversations_{s}"] = self.conversations[s]
            m[f"{prefix}/preference_pairs_{s}"] = self.preference_pairs[s]
        return m

    def skip_bad(self, bad: BadRecord, strict: bool) -> None:
        """Count and list a malformed record, or, with ``fetch.strict``, fail on it."""
        if strict:
            raise CorpusError(f"malformed record at {bad} (fetch.strict is true)")
        self.bad_records += 1
        if len(self.bad_listed) < MAX_LISTED:
            self.bad_listed.append(str(bad))

    @property
    def bad_examples(self) -> list[str]:
        return self.bad_listed[:MAX_REPORTED]


def source_records(cfg: FetchConfig, root: Path | None = None) -> Iterator[Record | BadRecord]:
    """Every record of the configured source, then the builtin SFT additions."""
    if cfg.source == "builtin":
        yield from builtin_documents()
        if cfg.builtin_code:
            yield from stdlib_code_documents()
    elif cfg.source == "files":
        for path in expand_paths(cfg.paths, root):
            yield from read_file(path, cfg.text_field)
    elif cfg.source == "hf":
        yield from read_hf(cfg)
    if cfg.doc_questions:
        yield from doc_conversations()
    if cfg.synthetic_per_task:
        # The seed is fixed by content, not base.seed, so that the SFT set is a property of
        # the corpus params alone.
        yield from synthetic_conversations(cfg.synthetic_per_task, seed=0,
                                           val_per_task=cfg.synthetic_val_per_task,
                                           test_per_task=cfg.synthetic_test_per_task)


def _cleaned(rec: Record, cfg: FetchConfig, stats: CorpusStats) -> Record | None:
    """The record with its text stripped, or None (counted) when nothing is left of it."""
    if isinstance(rec, Document):
        text = rec.text.strip()
        if len(text) >= cfg.min_chars:
            return replace(rec, text=text)
    elif not any(r == "assistant" and not c.strip() for r, c in rec.messages):
        return rec
    stats.empty_dropped += 1
    return None


def _read_all(records: Iterable[Record | BadRecord], cfg: FetchConfig, stats: CorpusStats
              ) -> tuple[list[tuple[str, Document]], list[tuple[str, Conversation]],
                         list[Document]]:
    """(id, record) of every clean, new document and conversation, within the limits; and
    the exact duplicates of documents dropped (their groups must still join the copy's)."""
    docs: list[tuple[str, Document]] = []
    convs: list[tuple[str, Conversation]] = []
    copies: list[Document] = []
    seen: set[str] = set()
    total_bytes = 0
    for raw in records:
        if isinstance(raw, BadRecord):
            stats.skip_bad(raw, cfg.strict)
            continue
        rec = _cleaned(raw, cfg, stats)
        if rec is None:
            continue
        key = content_key(rec)
        if key in seen:
            if isinstance(rec, Document):
                stats.duplicates_dropped += 1
                if rec.group and not rec.train_only:
                    copies.append(rec)
            else:
                stats.sft_duplicates_dropped += 1
            continue
        seen.add(key)
        if isinstance(rec, Conversation):
            convs.append((key, rec))
            continue
        size = len(rec.text.encode("utf-8"))
        if (cfg.max_documents is not None and len(docs) >= cfg.max_documents) or (
                cfg.max_bytes is not None and total_bytes + size > cfg.max_bytes):
            stats.limit_dropped += 1
            continue
        total_bytes += size
        docs.append((key, rec))
    return docs, convs, copies


def collect(records: Iterable[Record | BadRecord], cfg: FetchConfig
            ) -> tuple[dict[str, list[dict]], CorpusStats]:
    """Clean, de-duplicate, limit and split records into rows per table.

    Splits follow pool keys (:mod:`llmcore.data.splits`): a document's group (its content
    hash when it has none), merged with the groups it nearly copies; a conversation's own
    keys (a doc question: its document's group; a synthetic one: its word or pair, with the
    split it was drawn for), or its content hash.
    """
    stats = CorpusStats()
    docs, convs, copies = _read_all(records, cfg, stats)
    if not docs:
        raise CorpusError(
            f"no documents left after cleaning (source {cfg.source!r}: "
            f"{stats.empty_dropped} empty, {stats.bad_records} malformed, "
            f"{stats.duplicates_dropped} duplicates). Check fetch.paths / fetch.hf_dataset and "
            f"that the records have a non-empty {cfg.text_field!r} field.")
    own = {key: d.group or f"doc:{key}" for key, d in docs}
    # a dropped exact copy still joins its group to the kept one's: the questions about it
    # (e.g. the reference topics `if` and `else`, one text) must follow that text
    shown = [(own[k], d.text) for k, d in docs if not d.train_only] + [
        (d.group, d.text) for d in copies if d.group]
    merged = merge_near_copies([g for g, _ in shown], [t for _, t in shown])

    def group(g: str) -> str:
        return merged.get(g, g)

    rows: list[dict] = []
    for key, d in docs:
        rows.append({"table": "pretrain", "split": d.split, "train_only": d.train_only,
                     "id": key, "text": d.text, "source": d.source, "pool": [group(own[key])]})
    for key, c in convs:
        pool = [group(k) for k in c.pool] or [f"conversation:{key}"]
        rows.append({"table": "sft", "split": c.split, "train_only": False, "id": key,
                     "messages": c.as_dicts(), "task": c.task, "answer": c.answer,
                     "source": c.source, "pool": list(dict.fromkeys(pool))})
    assign_splits(rows, cfg.val_fraction, cfg.test_fraction, stats.notes)
    tables: dict[str, list[dict]] = {f"{t}_{s}": [] for t in ("pretrain", "sft") for s in SPLITS}
    for row in rows:
        split, table, train_only = row.pop("split"), row.pop("table"), row.pop("train_only")
        if train_only and split != "train":
            stats.held_out_dropped += 1  # the code of a held-out module: in no split
            continue
        tables[f"{table}_{split}"].append(row)
        if table == "pretrain":
            stats.documents[split] += 1
            stats.bytes[split] += len(row["text"].encode("utf-8"))
        else:
            stats.conversations[split] += 1
            stats.sft_tasks[row["task"]] += 1
    breach = pool_breach(tables)
    if breach:
        raise CorpusError(f"split contract broken while building the corpus: {breach}")
    return tables, stats
