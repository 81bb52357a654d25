"""Three splits by construction: which of ``train`` / ``val`` / ``test`` a record belongs to.

| split | used for | never used for |
|---|---|---|
| ``train`` | every training stream: pretraining rows (chat mix included), SFT rows, DPO pairs, RL prompts | reporting |
| ``val`` | every decision: best checkpoint, early stopping, registry promotion, sweeps | the reported table |
| ``test`` | the reported table, the README, the showcase | any decision |

A record's split is a pure function of its *pool key*, never of the record itself: the key
is what the record is about, so that everything about one thing lands on one side.

* Documents and the questions asked about them: the key is their *group* (a module or a
  topic of the builtin corpus, a file's content hash for user data), after groups whose
  documents are near-copies of each other are merged (:func:`merge_near_copies`).
* Synthetic task questions: the word (one pool shared by spell, count and reverse: all three
  replies spell the word) or the unordered operand pair (``12 + 7`` and ``12 - 7`` together).
  Each split's questions are drawn from that split's pool only (:mod:`llmcore.data.tasks`).
* Preference pairs: the prompt. User conversations: their content.

``split_of`` maps SHA-256 of the key to [0, 1): below ``test`` is test, below ``test + val``
is val, the rest train. Adding a record never moves another one. The price: on small data the
shares are only approximate, and a merged group's split follows its smallest member's key.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmcore.data.corpus import SPLITS
from llmcore.data.ngrams import NGRAM, Words, gram_hashes

__all__ = ["CONTRACTS", "MIN_TEST_EXAMPLES", "SPLITS", "assign_splits", "merge_near_copies",
           "pool_breach", "split_of", "unit_interval"]

# Near-copies: a document whose 13-word runs are found in another group's documents for at
# least this share joins that group. Well below the contract's limit (half of an example's
# runs shared with training), so that what is left across splits is incidental phrasing.
NEAR_COPY_SHARE = 0.1
# a run found in more groups than this is boilerplate (a licence line, a common sentence):
# it counts toward nothing, or it would join unrelated modules into one group
COMMON_RUN_GROUPS = 6


def unit_interval(key: str) -> float:
    """SHA-256 of ``key`` as a number in [0, 1)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """``test`` for a share ``test_fraction`` of keys, ``val`` for ``val_fraction``, else
    ``train``; decided by the key alone."""
    u = unit_interval(key)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller name represents the group: stable whatever the order
            self.parent[max(ra, rb)] = min(ra, rb)


def merge_near_copies(groups: Sequence[str], texts: Sequence[str], n: int = NGRAM,
                      share: float = NEAR_COPY_SHARE) -> dict[str, str]:
    """Group -> the group it is merged into, for documents ``texts`` of ``groups``.

    Two groups merge when a document of one has ``share`` or more of its ``n``-word runs in
    documents of the other (runs found in more than ``COMMON_RUN_GROUPS`` groups excepted), and
    merging is transitive. So ``posixpath`` and ``ntpath``, or a class documented in two
    modules, land in one split. Cost: one pass over the words, a dict of the runs shared
    between groups.
    """
    words = Words()
    grams = [np.unique(gram_hashes(words(t), n)) for t in texts]
    owners: dict[int, set[str]] = defaultdict(set)
    for g, hashes in zip(groups, grams, strict=True):
        for h in hashes.tolist():
            owners[h].add(g)
    shared = {h: gs for h, gs in owners.items() if 1 < len(gs) <= COMMON_RUN_GROUPS}
    union = _Union()
    for g in groups:
        union.find(g)
    for g, hashes in zip(groups, grams, strict=True):
        if not len(hashes):
            continue
        counts: Counter[str] = Counter()
        for h in hashes.tolist():
            for other in shared.get(h, ()):
                if other != g:
                    counts[other] += 1
        for other, c in counts.items():
            if c >= share * len(hashes):
                union.join(g, other)
    return {g: union.find(g) for g in set(groups)}


def assign_splits(rows: list[dict], val_fraction: float, test_fraction: float,
                  notes: list[str], tables: Sequence[tuple[str, str]] = (
                      ("pretrain", "documents"), ("sft", "conversations"))) -> None:
    """Set each row's ``split`` (where it is not fixed) from its pool keys.

    Rows that share a key share a split; a row whose keys would split apart goes to the
    split of its first key. Per table (``tables``: name, what its rows are), when two or more
    groups exist but val or train got none, the group nearest the split line crosses it,
    whole; a single group trains. An empty test split of documents is allowed and noted: the
    evaluate stage then reports nothing for it.
    """
    fixed = {k: r["split"] for r in rows if r["split"] for k in r["pool"]}
    keys = sorted({r["pool"][0] for r in rows if not r["split"]})
    place = {k: split_of(k, val_fraction, test_fraction) for k in keys}
    decided: set[str] = set(fixed)  # keys an earlier table placed: a later one leaves them
    for table, what in tables:
        movable = sorted({r["pool"][0] for r in rows if r["table"] == table and not r["split"]}
                         - decided)
        decided.update(movable)

        def held(split: str, movable: list[str] = movable) -> list[str]:
            return [k for k in movable if place[k] == split]

        if len(movable) == 1 and place[movable[0]] != "train":
            notes.append(f"only one group of {what}: none is held out (add {what})")
            place[movable[0]] = "train"
        if len(movable) >= 2 and not held("train"):
            key = max(movable, key=unit_interval)  # the held-out group nearest train's line
            notes.append(f"the hash left train without {what}: the group {key!r} moved there")
            place[key] = "train"
        if len(movable) >= 2 and not held("val"):
            # from train only while train keeps a group, else from test
            source = held("train") if len(held("train")) >= 2 else held("test")
            if source:
                key = min(source, key=unit_interval)
                notes.append(f"the hash left val without {what}: the group {key!r} moved "
                             "there")
                place[key] = "val"
        if table == "pretrain" and movable and not held("test"):
            notes.append("no group of documents is in the test split (too small a corpus): "
                         "the evaluate stage has no held-out documents to report")
    for r in rows:
        if not r["split"]:
            first = r["pool"][0]
            r["split"] = fixed.get(first) or place[first]


def pool_breach(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str | None:
    """The first pool key found in two splits, described (None when every key is in one)."""
    where: dict[str, tuple[str, str]] = {}
    for name in sorted(tables):
        split = name.rsplit("_", 1)[1]
        for i, row in enumerate(tables[name]):
            for key in row.get("pool") or ():
                other = where.setdefault(key, (split, name))
                if other[0] != split:
                    # preference rows are read without their id: their place names them
                    at = f"row {row['id'][:12]}" if row.get("id") else f"row #{i}"
                    return (f"{key!r} is in {other[1]} and in {name} ({at}); "
                            "a held-out example must share no pool with training")
    return None


# Each evaluation set's contract: what its test examples are drawn from, what they may share
# with training and why. The evaluate stage checks every one (llmcore.eval.contamination)
# and prints them in its report; docs/evaluation.md shows the same table.
CONTRACTS = {
    "arithmetic": "sums and differences of operand pairs {a, b} of the test pool (unordered: "
                  "12 + 7, 7 + 12 and 12 - 7 are one pair); products of numbers up to 12 are "
                  "table facts with no working, all of them trained, none tested",
    "spell": "words of the test word pool, one pool shared by spell, count and reverse "
             "(every reply spells its word); letters are shared (every task needs them)",
    "count": "words of the test word pool (as spell); the letter asked about is any letter",
    "reverse": "words of the test word pool (as spell)",
    "doc_questions": "questions about documents of test groups (a stdlib package or a "
                     "reference topic, near-copies merged); the document, the question and "
                     "its answer are in the test split only",
    "docs_test": "documents of test groups: in no training stream (bits per byte is on them)",
    "chat_test": "user conversations whose content hashes to test",
    "preferences_test": "user preference pairs whose prompt hashes to test (every pair of one "
                        "prompt on one side)",
}

# The smallest test set each contract promises on the builtin corpus (a Wilson interval at
# n = 200 is about +-0.07 wide at p = 0.5; 50 documents are ~100 rows of 256 tokens). The
# evaluate stage reports each set's size against it; a user corpus may be smaller (noted).
MIN_TEST_EXAMPLES = {"arithmetic": 200, "spell": 200, "count": 200, "reverse": 200,
                     "doc_questions": 200, "docs_test": 50}
