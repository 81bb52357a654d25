"""Corpus sources: raw documents for pretraining and conversations for SFT.

Sources
  * ``builtin`` (offline default): the documentation that ships inside every CPython install,
    i.e. the ``pydoc_data`` language-reference topics and the docstrings of the standard library,
    read with :mod:`ast` (nothing is imported, so no module side effects). One document per
    topic and per module, laid out like ``pydoc`` output. The SFT set asks about a topic, module,
    class or function and answers with its documented text, plus synthetic tasks whose answers
    can be checked exactly (arithmetic, spelling, counting letters, reversing words).
  * ``files``: ``.txt``/``.md`` (one document per file), ``.jsonl`` (``{"text": ...}``, or
    ``{"conversations": [...]}`` as MiniMind writes it, or ``{"messages": [...]}`` as Hugging Face
    chat sets do; ShareGPT's ``from``/``value`` keys are accepted too) and ``.parquet`` with the
    same columns.
  * ``hf``: a Hugging Face dataset streamed with ``datasets`` (hub id, or a local folder).

Cleaning drops empty documents, removes exact duplicates (by SHA-256 of the text, or of the
canonical JSON of a conversation) and applies document/byte limits. Malformed records are
skipped and counted, the first few reported with ``file:line``; ``strict`` turns them into
errors.

The train/val split is a pure function of the content: SHA-256 of the text mapped to [0, 1)
and compared with ``val_fraction``. Adding or removing a document never moves another one
between splits. The price: the val fraction is only approximately ``val_fraction`` on small
corpora, and near-duplicates may land on both sides.

The builtin corpus depends on the Python version that runs the stage (its docs change between
releases); the manifest records that version.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import random
import re
import socket
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from llmcore.config import FetchConfig, UserError
from llmcore.files import atomic_dir

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "bot": "assistant"}
SPLITS = ("train", "val")
MAX_REPORTED = 5  # malformed records printed; all of them go to BAD_RECORDS_FILE
MAX_LISTED = 100_000  # malformed records listed in BAD_RECORDS_FILE (all are counted)
BAD_RECORDS_FILE = "bad_records.txt"


class CorpusError(UserError):
    """The corpus cannot be built; the message says what to fix."""


class BadRecord(ValueError):
    """One malformed input record; ``location`` is ``file:line`` or similar."""

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason}")


@dataclass(frozen=True)
class Document:
    text: str
    source: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    source: str
    task: str = "chat"
    answer: str | None = None  # exact expected final reply, for tasks that have one

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


Record = Document | Conversation


# --------------------------------------------------------------------------------------------
# Hashing and splitting
# --------------------------------------------------------------------------------------------


def content_key(record: Record) -> str:
    if isinstance(record, Document):
        payload = record.text
    else:
        payload = json.dumps(record.messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def split_of(key_hex: str, val_fraction: float) -> str:
    """``"val"`` for a fraction ``val_fraction`` of keys, decided by the key alone."""
    return "val" if int(key_hex[:16], 16) / 2.0**64 < val_fraction else "train"


# --------------------------------------------------------------------------------------------
# Record parsing shared by jsonl, parquet and hf rows
# --------------------------------------------------------------------------------------------


def _parse_messages(raw: Any, location: str) -> tuple[tuple[str, str], ...]:
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
    if not any(r == "assistant" for r, _ in out):
        raise BadRecord(location, "conversation has no assistant message")
    return tuple(out)


def parse_record(row: Any, location: str, text_field: str, source: str) -> Record:
    """Turn one JSON-like row into a Document or a Conversation, or raise BadRecord."""
    if not isinstance(row, dict):
        raise BadRecord(location, f"expected a JSON object, got {type(row).__name__}")
    for key in ("conversations", "messages"):
        if row.get(key) is not None:
            msgs = _parse_messages(row[key], location)
            task = row.get("task") if isinstance(row.get("task"), str) else "chat"
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


# --------------------------------------------------------------------------------------------
# Source: files
# --------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED = TEXT_SUFFIXES + (".jsonl", ".parquet")


def expand_paths(patterns: Iterable[str], root: Path | None = None) -> list[Path]:
    """Expand files/globs (relative to ``root``) into a sorted, de-duplicated file list."""
    root = root or Path.cwd()
    found: list[Path] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(root / pattern)
        matches = sorted(glob.glob(full, recursive=True))
        if not matches:
            raise CorpusError(f"fetch.paths: {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.extend(sorted(q for q in p.rglob("*") if q.suffix in SUPPORTED))
            elif p.suffix not in SUPPORTED:
                raise CorpusError(
                    f"fetch.paths: {m} has an unsupported type (use {', '.join(SUPPORTED)})"
                )
            else:
                found.append(p)
    return list(dict.fromkeys(found))


def _decode(data: bytes, location: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(location, f"invalid UTF-8 at byte {exc.start}") from None


def read_file(path: Path, text_field: str) -> Iterator[Record | BadRecord]:
    """Records of one file; malformed ones are yielded as BadRecord instances, not raised."""
    source = f"file:{path}"
    if path.suffix in TEXT_SUFFIXES:
        try:
            yield Document(_decode(path.read_bytes(), str(path)), source)
        except BadRecord as bad:
            yield bad
    elif path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                location = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    line = _decode(raw, location)
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise BadRecord(location, f"invalid JSON ({exc.msg})") from None
                    yield parse_record(row, location, text_field, source)
                except BadRecord as bad:
                    yield bad
    elif path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            yield BadRecord(str(path), f"unreadable Parquet file ({exc})")
            return
        for i, row in enumerate(table.to_pylist()):
            try:
                yield parse_record(row, f"{path}:row {i}", text_field, source)
            except BadRecord as bad:
                yield bad


# --------------------------------------------------------------------------------------------
# Source: Hugging Face datasets
# --------------------------------------------------------------------------------------------

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
            yield parse_record(row, f"hf:{name}:{i}", cfg.text_field, f"hf:{name}")
        except BadRecord as bad:
            yield bad


# --------------------------------------------------------------------------------------------
# Source: builtin (Python's own documentation)
# --------------------------------------------------------------------------------------------

_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
               "turtledemo", "ensurepip", "__pycache__", "tkinter", "__phello__"}


@dataclass(frozen=True)
class DocEntry:
    """One documented object: a topic, module, class or function."""

    kind: str  # topic | module | class | function
    name: str
    signature: str
    doc: str


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _SKIP_PARTS or p.startswith(("test_", "config-")) for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(not p.isidentifier() for p in parts):
            continue
        out.append((".".join(parts), path))
    return out


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        args = ast.unparse(node.args)
    except Exception:  # pragma: no cover - ast.unparse handles every valid tree
        args = "..."
    return f"{node.name}({args})"


def _collect_entries(body: list[ast.stmt], prefix: str, depth: int, out: list[DocEntry]) -> None:
    """Documented public classes and functions (and methods of top-level classes)."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") and node.name != "__init__":
            continue
        doc = ast.get_docstring(node)
        qual = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            if doc:
                out.append(DocEntry("class", qual, f"class {qual}", doc))
            if depth == 0:
                _collect_entries(node.body, qual, depth + 1, out)
        elif doc:
            out.append(DocEntry("function", qual, f"{prefix}.{_signature(node)}", doc))


def stdlib_entries() -> Iterator[tuple[str, list[DocEntry]]]:
    """``(module name, entries)`` for each stdlib module, in a stable order."""
    for modname, path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        entries = []
        mdoc = ast.get_docstring(tree)
        if mdoc:
            entries.append(DocEntry("module", modname, modname, mdoc))
        _collect_entries(tree.body, modname, 0, entries)
        if entries:
            yield modname, entries


def pydoc_topics() -> list[DocEntry]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key].strip()
        title = text.splitlines()[0].strip() if text else key
        out.append(DocEntry("topic", key, title, text))
    return out


def builtin_documents(max_chars: int = 3000) -> Iterator[Document]:
    """Pydoc topics, and stdlib modules formatted like ``pydoc`` output.

    A module's entries are grouped into documents of about ``max_chars`` (whole entries only),
    so that the few huge modules do not make the val split a lottery of a handful of files.
    """
    for entry in pydoc_topics():
        yield Document(entry.doc, f"builtin:topic/{entry.name}")
    for modname, entries in stdlib_entries():
        parts: list[str] = []
        size = 0
        for e in entries:
            if e.kind == "module":
                part = f"Help on module {modname}:\n\n{e.doc}"
            else:
                body = "\n".join("    " + ln if ln else "" for ln in e.doc.splitlines())
                part = f"{e.signature}\n{body}"
            if parts and size + len(part) > max_chars:
                yield Document("\n\n".join(parts), f"builtin:module/{modname}")
                parts, size = [f"Help on module {modname} (continued):"], 0
            parts.append(part)
            size += len(part)
        yield Document("\n\n".join(parts), f"builtin:module/{modname}")


def first_paragraphs(text: str, max_chars: int = 600) -> str:
    """Leading paragraphs of a docstring, whole paragraphs only, at most ``max_chars``."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out: list[str] = []
    for p in paras:
        if out and len("\n\n".join(out + [p])) > max_chars:
            break
        out.append(p)
    answer = "\n\n".join(out)
    return answer if len(answer) <= max_chars * 2 else answer[: max_chars * 2].rsplit(" ", 1)[0]


_DOC_QUESTIONS = {
    "topic": ("Explain {title} in Python.", "What does the Python reference say about {title}?"),
    "module": ("What is the Python `{name}` module for?", "Describe the `{name}` module."),
    "class": ("What is `{name}`?", "Describe the class `{name}`."),
    "function": ("What does `{name}` do?", "Explain `{sig}`."),
}
SYSTEM_PROMPT = "You are a helpful assistant who answers questions about Python precisely."


def doc_conversations(min_chars: int = 40) -> Iterator[Conversation]:
    """A question about each documented topic/module/class/function, answered from its doc."""
    entries = pydoc_topics() + [e for _, es in stdlib_entries() for e in es]
    for e in entries:
        answer = first_paragraphs(e.doc)
        if len(answer) < min_chars:
            continue
        templates = _DOC_QUESTIONS[e.kind]
        pick = int(hashlib.sha256(e.name.encode()).hexdigest()[:8], 16) % len(templates)
        title = e.signature.strip('"*')
        question = templates[pick].format(name=e.name, sig=e.signature, title=title)
        yield Conversation((("user", question), ("assistant", answer)),
                           f"builtin:doc/{e.kind}", "doc", answer)


def word_list(min_len: int = 3, max_len: int = 10, size: int = 2000) -> list[str]:
    """The most frequent plain lowercase words of the pydoc topics (stable for a Python version)."""
    counts: Counter[str] = Counter()
    for e in pydoc_topics():
        counts.update(w for w in re.findall(r"\b[a-z]+\b", e.doc) if min_len <= len(w) <= max_len)
    return sorted(w for w, _ in counts.most_common(size))


def _synthetic_one(task: str, rng: random.Random, words: list[str]) -> tuple[str, str]:
    if task == "arithmetic":
        op = rng.choice("+-*")
        a, b = (rng.randint(0, 99), rng.randint(0, 99)) if op != "*" else (
            rng.randint(0, 12), rng.randint(0, 12))
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
        return q.format(a=a, op=op, b=b), str(value)
    word = rng.choice(words)
    if task == "spell":
        q = rng.choice(("Spell the word '{w}'.", "How do you spell '{w}' letter by letter?"))
        return q.format(w=word), "-".join(word)
    if task == "count":
        letter = rng.choice(sorted(set(word)) if rng.random() < 0.8 else "abcdefghijklmnopqrstuvwxyz")
        q = "How many times does the letter '{c}' appear in '{w}'?"
        return q.format(c=letter, w=word), str(word.count(letter))
    if task == "reverse":
        return f"Reverse the word '{word}'.", word[::-1]
    raise ValueError(f"unknown synthetic task {task!r}")


SYNTHETIC_TASKS = ("arithmetic", "spell", "count", "reverse")


def synthetic_conversations(per_task: int, seed: int) -> Iterator[Conversation]:
    """Tasks with one exactly checkable answer. A fifth have a system prompt, a fifth two turns."""
    words = word_list()
    for task in SYNTHETIC_TASKS:
        rng = random.Random(f"{seed}:{task}")
        for _ in range(per_task):
            turns: list[tuple[str, str]] = []
            if rng.random() < 0.2:
                turns.append(("system", SYSTEM_PROMPT))
            n_turns = 2 if rng.random() < 0.2 else 1
            answer = ""
            for _ in range(n_turns):
                q, answer = _synthetic_one(task, rng, words)
                turns += [("user", q), ("assistant", answer)]
            yield Conversation(tuple(turns), f"builtin:synthetic/{task}", task, answer)


# --------------------------------------------------------------------------------------------
# Cleaning, splitting and writing
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    conversations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    sft_tasks: Counter = field(default_factory=Counter)
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    sft_duplicates_dropped: int = 0
    bad_records: int = 0
    bad_listed: list[str] = field(default_factory=list)  # the first MAX_LISTED
    notes: list[str] = field(default_factory=list)  # what the user should know (small corpus)
    limit_dropped: int = 0
    seconds: float = 0.0

    def metrics(self, prefix: str = "fetch") -> dict[str, float]:
        m = {
            f"{prefix}/documents": sum(self.documents.values()),
            f"{prefix}/bytes": sum(self.bytes.values()),
            f"{prefix}/conversations": sum(self.conversations.values()),
            f"{prefix}/empty_dropped": self.empty_dropped,
            f"{prefix}/duplicates_dropped": self.duplicates_dropped + self.sft_duplicates_dropped,
            f"{prefix}/bad_records": self.bad_records,
            f"{prefix}/limit_dropped": self.limit_dropped,
            f"{prefix}/seconds": round(self.seconds, 3),
        }
        for s in SPLITS:
            m[f"{prefix}/documents_{s}"] = self.documents[s]
            m[f"{prefix}/bytes_{s}"] = self.bytes[s]
            m[f"{prefix}/conversations_{s}"] = self.conversations[s]
        return m

    @property
    def bad_examples(self) -> list[str]:
        return self.bad_listed[:MAX_REPORTED]


def source_records(cfg: FetchConfig, root: Path | None = None) -> Iterator[Record | BadRecord]:
    """Every record of the configured source, then the builtin SFT additions."""
    if cfg.source == "builtin":
        yield from builtin_documents()
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
        yield from synthetic_conversations(cfg.synthetic_per_task, seed=0)


PRETRAIN_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.large_string()),
                             ("source", pa.string())])
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.large_string())]))
SFT_SCHEMA = pa.schema([("id", pa.string()), ("messages", MESSAGE_TYPE), ("task", pa.string()),
                        ("answer", pa.large_string()), ("source", pa.string())])


def collect(records: Iterable[Record | BadRecord], cfg: FetchConfig
            ) -> tuple[dict[str, list[dict]], CorpusStats]:
    """Clean, de-duplicate, limit and split records into rows per table."""
    stats = CorpusStats()
    tables: dict[str, list[dict]] = {f"{k}_{s}": [] for k in ("pretrain", "sft") for s in SPLITS}
    seen: set[str] = set()
    total_docs = total_bytes = 0
    for rec in records:
        if isinstance(rec, BadRecord):
            if cfg.strict:
                raise CorpusError(f"malformed record at {rec} (fetch.strict is true)")
            stats.bad_records += 1
            if len(stats.bad_listed) < MAX_LISTED:
                stats.bad_listed.append(str(rec))
            continue
        if isinstance(rec, Document):
            text = rec.text.strip()
            if len(text) < cfg.min_chars:
                stats.empty_dropped += 1
                continue
            rec = Document(text, rec.source)
        elif any(r == "assistant" and not c.strip() for r, c in rec.messages):
            stats.empty_dropped += 1
            continue
        key = content_key(rec)
        if key in seen:
            if isinstance(rec, Document):
                stats.duplicates_dropped += 1
            else:
                stats.sft_duplicates_dropped += 1
            continue
        seen.add(key)
        split = split_of(key, cfg.val_fraction)
        if isinstance(rec, Document):
            size = len(rec.text.encode("utf-8"))
            if (cfg.max_documents is not None and total_docs >= cfg.max_documents) or (
                cfg.max_bytes is not None and total_bytes + size > cfg.max_bytes
            ):
                stats.limit_dropped += 1
                continue
            total_docs += 1
            total_bytes += size
            stats.documents[split] += 1
            stats.bytes[split] += size
            tables[f"pretrain_{split}"].append({"id": key, "text": rec.text, "source": rec.source})
        else:
            stats.conversations[split] += 1
            stats.sft_tasks[rec.task] += 1
            tables[f"sft_{split}"].append({"id": key, "messages": rec.as_dicts(), "task": rec.task,
                                           "answer": rec.answer, "source": rec.source})
    if total_docs == 0:
        raise CorpusError(
            f"no documents left after cleaning (source {cfg.source!r}: "
            f"{stats.empty_dropped} empty, {stats.bad_records} malformed, "
            f"{stats.duplicates_dropped} duplicates). Check fetch.paths / fetch.hf_dataset and "
            "that the records have a non-empty "
            f"{cfg.text_field!r} field."
        )
    _both_splits(tables, "pretrain", stats.documents, stats.bytes, "documents", stats.notes)
    _both_splits(tables, "sft", stats.conversations, None, "conversations", stats.notes)
    return tables, stats


def _both_splits(tables: dict[str, list[dict]], kind: str, counts: dict[str, int],
                 sizes: dict[str, int] | None, what: str, notes: list[str]) -> None:
    """Make sure train and val both have rows when there are two or more.

    The hash split holds out ~val_fraction of the rows, which on a small corpus can be none
    (or all). Then the row nearest the split line crosses it: the lowest hash of train goes to
    val (or the highest of val to train), so the choice still depends on content alone.
    """
    train, val = tables[f"{kind}_train"], tables[f"{kind}_val"]
    if (train and val) or not (train or val):
        return
    if len(train) + len(val) < 2:
        notes.append(f"only one {what[:-1]}: none is held out for validation (add {what})")
        if val:  # the one there is, is for training
            train.append(val.pop())
            counts["train"], counts["val"] = 1, 0
            if sizes is not None:
                sizes["train"], sizes["val"] = sizes["val"], 0
        return
    src, dst = (train, val) if not val else (val, train)
    row = min(src, key=lambda r: r["id"]) if not val else max(src, key=lambda r: r["id"])
    src.remove(row)
    dst.append(row)
    a, b = ("train", "val") if not val else ("val", "train")
    counts[a] -= 1
    counts[b] += 1
    if sizes is not None:
        size = len(row["text"].encode("utf-8"))
        sizes[a] -= size
        sizes[b] += size


def write_corpus(tables: dict[str, list[dict]], out_dir: Path, info: dict[str, Any],
                 bad_records: list[str]) -> None:
    """Write the tables as Parquet (rows sorted by id), the malformed records and a manifest,
    atomically (the previous corpus stays until the new one is whole)."""

    def fill(tmp: Path) -> None:
        files = {}
        for name, rows in tables.items():
            schema = PRETRAIN_SCHEMA if name.startswith("pretrain") else SFT_SCHEMA
            rows = sorted(rows, key=lambda r: r["id"])
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
            files[name] = {"file": f"{name}.parquet", "rows": len(rows)}
        (tmp / BAD_RECORDS_FILE).write_text("".join(f"{b}\n" for b in bad_records))
        manifest = {"tables": files, **info}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    atomic_dir(Path(out_dir), fill)


def build_corpus(cfg: FetchConfig, out_dir: Path, root: Path | None = None) -> CorpusStats:
    """Run the whole fetch: read the source, clean, split, write ``out_dir``."""
    start = time.perf_counter()
    tables, stats = collect(source_records(cfg, root), cfg)
    stats.seconds = time.perf_counter() - start
    info = {
        "source": cfg.source,
        "python_version": sys.version.split()[0] if cfg.source == "builtin" else None,
        "val_fraction": cfg.val_fraction,
        "bad_examples": stats.bad_examples,
        "sft_tasks": dict(sorted(stats.sft_tasks.items())),
    }
    write_corpus(tables, out_dir, info, stats.bad_listed)
    return stats


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise CorpusError(f"{path} is missing or unreadable ({str(exc)[:120]}); run "
                          "`dvc repro fetch`") from None


def read_texts(corpus_dir: Path, split: str = "train") -> list[str]:
    """Pretraining texts of one split."""
    table = _read_table(Path(corpus_dir) / f"pretrain_{split}.parquet", ["text"])
    return table.column("text").to_pylist()


def read_conversations(corpus_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    """SFT rows of one split: ``{"id", "messages", "task", "answer", "source"}``."""
    return _read_table(Path(corpus_dir) / f"sft_{split}.parquet").to_pylist()
