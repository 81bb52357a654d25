"""Corpus sources: reading documents and conversations, skipping malformed records.

Sources
  * ``builtin`` (offline default, :mod:`llmcore.data.pydocs`): Python's own documentation.
  * ``files``: ``.txt``/``.md`` (one document per file), ``.jsonl`` (``{"text": ...}``, or
    ``{"conversations": [...]}`` as MiniMind writes it, or ``{"messages": [...]}`` as Hugging Face
    chat sets do; ShareGPT's ``from``/``value`` keys are accepted too) and ``.parquet`` with the
    same columns.
  * ``hf``: a Hugging Face dataset streamed with ``datasets`` (hub id, or a local folder).
  * ``preference_paths`` (any source): preference pairs for DPO, parsed by
    :mod:`llmcore.data.preferences` with this module's row reader, written to their own tables.

Malformed records are yielded as :class:`BadRecord` values, never raised, so that the caller
(:mod:`llmcore.data.assemble`) skips, counts and lists them. Cleaning, de-duplicating and
splitting what is read is :mod:`llmcore.data.assemble`'s job.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from llmcore.config.fetch import FetchConfig
from llmcore.data.corpus import (
    BadRecord,
    Conversation,
    CorpusError,
    Document,
    Record,
    unencodable,
)
from llmcore.data.pydocs import builtin_documents, doc_conversations, stdlib_code_documents
from llmcore.data.tasks import synthetic_conversations

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "bot": "assistant"}


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
        yield from synthetic_conversations(cfg.synthetic_task_weights.counts(
                                               cfg.synthetic_per_task), seed=0,
                                           val_per_task=cfg.synthetic_val_per_task,
                                           test_per_task=cfg.synthetic_test_per_task)
