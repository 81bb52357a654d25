"""The corpus on disk: its record types, its Parquet tables, reading them back.

``data/corpus/`` holds six tables, one file per split (train, val, test):
``pretrain_<split>.parquet`` (``id``, ``text``, ``source``, ``pool``) and
``sft_<split>.parquet`` (``id``, ``messages``, ``task``, ``answer``, ``source``, ``pool``),
rows sorted by id, plus ``bad_records.txt`` (every malformed input record, by ``file:line``)
and ``manifest.json``. The ``id`` is the SHA-256 of the content; ``pool`` lists the keys that
decided the row's split (a document group, a word, an operand pair: :mod:`llmcore.data.splits`),
so a contract can be checked with a few lines of pyarrow: no key of a held-out table is in a
train table. When ``fetch.preference_paths`` names files, three more:
``preferences_<split>.parquet`` (``id``, ``prompt``, ``chosen``, ``rejected``, ``source``,
``pool``; :mod:`llmcore.data.preferences`); a corpus without them reads as having no pairs.

Everything that reads the corpus (tokenizer, pack, evaluate, quantize) needs only this module,
not the readers of the sources, so a change to how a source is read re-runs fetch and what
depends on its output, not every reader of the corpus code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from llmcore.files import atomic_dir
from llmcore.schema import JSONValue, UserError

# train: every training stream; val: every decision; test: only reported (what decides a
# row's split is llmcore.data.splits, which fetch alone needs)
SPLITS = ("train", "val", "test")

BAD_RECORDS_FILE = "bad_records.txt"


class CorpusError(UserError):
    """The corpus cannot be built; the message says what to fix."""


class UnencodableText(UserError):
    """Text with a character that UTF-8 cannot encode: a lone UTF-16 surrogate, which JSON's
    ``"\\ud800"`` escape allows (scraped text has them, e.g. half of a cut emoji) and Python
    makes of undecodable bytes in arguments. The tokenizer cannot take it, and neither can a
    Parquet table, so it is refused where it comes in, naming the field."""

    def __init__(self, field: str, index: int, char: str) -> None:
        self.field, self.index = field, index
        super().__init__(f"{field}: character {index} (U+{ord(char):04X}) cannot be encoded "
                         "as UTF-8 (a lone UTF-16 surrogate); remove or replace it")


def unencodable(value: JSONValue, field: str = "text") -> UnencodableText | None:
    """The first string inside ``value`` (a string, or lists and dicts of them) that UTF-8
    cannot encode, as an error naming where it is (``messages[1].content``), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return UnencodableText(field, exc.start, value[exc.start])
        return None
    if isinstance(value, dict):
        items: Any = ((f"{field}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{field}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, item in items:
        bad = unencodable(item, where)
        if bad is not None:
            return bad
    return None


def check_encodable(value: JSONValue, field: str) -> None:
    """Raise :class:`UnencodableText` if any string in ``value`` cannot be encoded."""
    bad = unencodable(value, field)
    if bad is not None:
        raise bad


class BadRecord(ValueError):
    """One malformed input record; ``location`` is ``file:line`` or similar."""

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason}")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    split: str | None = None  # a fixed split; None: decided by the group
    group: str | None = None  # what decides the split (a module, a topic); None: the content
    train_only: bool = False  # only ever trained on: left out when its group is held out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    source: str
    task: str = "chat"
    answer: str | None = None  # exact expected final reply, for tasks that have one
    split: str | None = None  # a fixed split; None: decided by the pool keys
    pool: tuple[str, ...] = ()  # what it is about (a group, a word, a pair); (): the content

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


Record = Document | Conversation


POOL_TYPE = pa.list_(pa.string())  # the pool keys that decided the row's split
PRETRAIN_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.large_string()),
                             ("source", pa.string()), ("pool", POOL_TYPE)])
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.large_string())]))
SFT_SCHEMA = pa.schema([("id", pa.string()), ("messages", MESSAGE_TYPE), ("task", pa.string()),
                        ("answer", pa.large_string()), ("source", pa.string()),
                        ("pool", POOL_TYPE)])
PREFERENCE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", MESSAGE_TYPE),
                               ("chosen", pa.large_string()), ("rejected", pa.large_string()),
                               ("source", pa.string()), ("pool", POOL_TYPE)])
PREFERENCES = "preferences"  # tables preferences_train, preferences_val, preferences_test


class DocumentRow(TypedDict):
    """A row of ``pretrain_<split>.parquet`` (:func:`read_documents`)."""

    id: str
    text: str
    source: str
    pool: list[str]


class ConversationRow(TypedDict):
    """A row of ``sft_<split>.parquet`` (:func:`read_conversations`)."""

    id: str
    messages: list[dict[str, str]]  # {"role", "content"}, as Conversation.as_dicts writes them
    task: str
    answer: str | None  # None: a conversation without an exact expected reply (chat)
    source: str
    pool: list[str]


class _PreferenceFields(TypedDict):
    prompt: list[dict[str, str]]  # {"role", "content"} messages; the last one is the user's
    chosen: str
    rejected: str
    source: str


class Preference(_PreferenceFields, total=False):
    """A preference pair: a row of ``preferences_<split>.parquet`` (:func:`read_preferences`,
    with ``pool``), or one DPO makes from a task conversation (with ``task``)."""

    task: str
    pool: list[str]


def _schema(table: str) -> pa.Schema:
    if table.startswith(PREFERENCES):
        return PREFERENCE_SCHEMA
    return PRETRAIN_SCHEMA if table.startswith("pretrain") else SFT_SCHEMA


def write_corpus(tables: dict[str, list[dict]], out_dir: Path, info: dict[str, Any],
                 bad_records: list[str]) -> None:
    """Write the tables as Parquet (rows sorted by id), the malformed records and a manifest,
    atomically (the previous corpus stays until the new one is whole)."""

    def fill(tmp: Path) -> None:
        files = {}
        for name, rows in tables.items():
            rows = sorted(rows, key=lambda r: r["id"])
            table = pa.Table.from_pylist(rows, schema=_schema(name))
            pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
            files[name] = {"file": f"{name}.parquet", "rows": len(rows)}
        (tmp / BAD_RECORDS_FILE).write_text("".join(f"{b}\n" for b in bad_records))
        manifest = {"tables": files, **info}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    atomic_dir(Path(out_dir), fill)


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


def read_documents(corpus_dir: Path, split: str) -> list[DocumentRow]:
    """Pretraining documents of one split: ``{"id", "text", "source", "pool"}``."""
    return _read_table(Path(corpus_dir) / f"pretrain_{split}.parquet").to_pylist()


def read_conversations(corpus_dir: Path, split: str = "train") -> list[ConversationRow]:
    """SFT rows of one split: ``{"id", "messages", "task", "answer", "source", "pool"}``."""
    return _read_table(Path(corpus_dir) / f"sft_{split}.parquet").to_pylist()


def task_subset(convs: list[ConversationRow], tasks: Sequence[str], per_task: int
                ) -> list[ConversationRow]:
    """Up to ``per_task`` conversations with an answer of each of ``tasks``, in corpus order
    (what DPO makes pairs from and GRPO rewards)."""
    out, counts = [], dict.fromkeys(tasks, 0)
    for c in convs:
        t = c["task"]
        if t in counts and c.get("answer") and counts[t] < per_task:
            out.append(c)
            counts[t] += 1
    return out


def expected_answer(conv: ConversationRow) -> str:
    """The exact expected final reply of a conversation that has one (a task's): what the
    tasks are scored, paired and rewarded on. ValueError for one without (a chat)."""
    answer = conv["answer"]
    if answer is None:
        raise ValueError(f"conversation {conv.get('id', '?')} ({conv.get('task')}) has no answer")
    return answer


def read_preferences(corpus_dir: Path, split: str) -> list[Preference]:
    """Preference pairs of one split: ``{"prompt": [{"role", "content"}, ...], "chosen",
    "rejected", "source"}``; none (an empty list) in a corpus built without any."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    path = Path(corpus_dir) / f"{PREFERENCES}_{split}.parquet"
    if not path.exists():
        return []
    return _read_table(path, ["prompt", "chosen", "rejected", "source", "pool"]).to_pylist()
