"""The corpus assembled from what the sources read: cleaned, de-duplicated, limited, split.

Cleaning drops empty documents, removes exact duplicates (by SHA-256 of the text, or of the
canonical JSON of a conversation) and applies document/byte limits. The exception: the
training conversations a generator draws with replacement (the synthetic tasks, whose split
is fixed to ``train``) keep their repeats. ``synthetic_per_task`` is then the number a task
trains on: dropping the repeats left reverse, one template over its train words, with under
half of its conversations and the other tasks each with a different share. Malformed records are
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

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from llmcore.config.fetch import FetchConfig
from llmcore.data.corpus import SPLITS, BadRecord, Conversation, CorpusError, Document, Record
from llmcore.data.sources import content_key
from llmcore.data.splits import assign_splits, merge_near_copies, pool_breach

MAX_REPORTED = 5  # malformed records printed; all of them go to the corpus's bad_records.txt
MAX_LISTED = 100_000  # malformed records listed there (all are counted)


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
    sft_repeats_kept: int = 0  # generated training conversations drawn again (kept)
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
            f"{prefix}/synthetic_repeats_kept": self.sft_repeats_kept,
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
        if key in seen and isinstance(rec, Conversation) and rec.split == "train":
            stats.sft_repeats_kept += 1  # drawn with replacement on purpose: its weight
        elif key in seen:
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
