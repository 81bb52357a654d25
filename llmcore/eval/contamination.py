"""The split contract, checked: no test example is something a training stream holds.

Two kinds of violation fail the evaluate stage (:func:`first_violation`), with one line
naming the set and the first violating example:

* a **pool breach**: a pool key (a document group, a word, an operand pair, a prompt) found in
  a training table and a held-out one (:func:`llmcore.data.splits.pool_breach`). Every
  training stream is made of the train tables only: pretraining rows (the chat mix is SFT
  train conversations), SFT rows, DPO pairs (train task conversations and train preference
  pairs) and RL prompts (train task conversations), so a key in no train table is in no
  stream;
* a **copy**: a test example whose ``n``-word runs (13, the rule of the GPT-3 paper) found in
  the training streams cover half or more of its own runs.

Smaller natural repeats (a sentence of boilerplate shared by two documents) are listed and
counted in the report, not hidden, and do not fail the stage. The streams are the pack
stage's rows, decoded: exactly what the model trained on. Special tokens become line breaks
on both sides; an example's system prompt is left out (a fixed sentence shared by a fifth of
all conversations would match everything). An example shorter than ``n`` words is checked
whole: contaminated if it appears as one run. Each example gets its *overlap*: the share of
its n-grams found in any stream. Word n-grams: :mod:`llmcore.data.ngrams`.

Trade-offs: exact n-grams miss paraphrases and do not know which overlaps matter; the
counts of shared runs are an upper bound, and the overlap share tells a copied example from
one that shares a phrase.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np

from llmcore.data.corpus import (
    ConversationRow,
    DocumentRow,
    Preference,
    read_conversations,
    read_documents,
    read_preferences,
)
from llmcore.data.ngrams import NGRAM, Words, example_grams, gram_hashes
from llmcore.data.shards import ShardDataset
from llmcore.data.splits import CONTRACTS, MIN_TEST_EXAMPLES, SPLITS, pool_breach
from llmcore.data.tokenizer import Chat, LLMTokenizer, render_chat
from llmcore.eval.evaluate import doc_mc_questions, task_examples
from llmcore.metric_keys import contamination_metric
from llmcore.schema import UserError

__all__ = ["NGRAM", "Contract", "ContractViolation", "NgramIndex", "SetResult", "Words",
           "check_contract", "check_set", "contamination_metrics", "contamination_report",
           "decontaminate", "evaluation_sets", "first_violation", "gram_hashes",
           "training_streams", "word_token_coverage"]

COPY_SHARE = 0.5  # a test example with this share of its runs in training is a copy


class ContractViolation(UserError):
    """A held-out example that training could reach: the evaluation would measure recall."""


def conversation_text(conv: Chat) -> str:
    """A conversation as the model read it in training (the chat template), system prompt left
    out."""
    return render_chat([m for m in conv["messages"] if m["role"] != "system"])


class NgramIndex:
    """One training stream's words, asked which n-gram hashes it holds.

    ``segments`` are 1-D arrays of word numbers whose n-grams count (a stream of rows joined,
    or one array per conversation); no n-gram crosses from one segment into the next. The
    segments are kept as one array, so each length is hashed in one pass over the stream.

    Why not a set of the stream's n-grams: the stream holds millions of words and the
    questions (a few thousand examples' n-grams) are few, so sorting the questions and
    looking every stream window up in them costs a pass per length, where a sorted set of
    the stream costs a sort of millions per length.
    """

    def __init__(self, segments: Iterable[np.ndarray]) -> None:
        parts = [s for s in segments if len(s)]
        self.words = sum(len(s) for s in parts)
        self._flat = (np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))
        self._segment = np.repeat(np.arange(len(parts)), [len(s) for s in parts])

    def contains(self, length: int, grams: np.ndarray) -> np.ndarray:
        """For each hash of ``grams`` (``length``-grams), whether the stream holds it."""
        if not len(grams) or self.words < length:
            return np.zeros(len(grams), dtype=bool)
        asked, back = np.unique(grams, return_inverse=True)
        windows = gram_hashes(self._flat, length)
        inside = self._segment[: len(windows)] == self._segment[length - 1 :]
        windows = windows[inside]
        at = np.minimum(np.searchsorted(asked, windows), len(asked) - 1)
        held = np.zeros(len(asked), dtype=bool)
        held[at[asked[at] == windows]] = True
        return held[back.reshape(-1)]


def rows_text(tok: LLMTokenizer, rows: np.ndarray, shared_token: bool) -> list[str]:
    """A split's token rows as text: pretraining rows are one stream cut into windows that
    share a token (joined back, so a run across a row boundary counts); SFT rows are each
    their own packed conversations."""
    if shared_token:
        return [tok.decode(np.concatenate([rows[0], rows[1:, 1:].reshape(-1)]).tolist())] \
            if len(rows) else []
    return [tok.decode(r.tolist()) for r in rows]


class SetSummary(TypedDict):
    """One set's counts in the report (:meth:`SetResult.summary`)."""

    examples: int
    contaminated: int  # examples that share a run with some stream
    by_stream: dict[str, int]  # stream -> examples that share a run with it
    overlap_half_or_more: int
    mean_overlap: float | None  # None: no examples


class FlaggedExample(TypedDict):
    """A test example that shares a run with training, in the report."""

    set: str
    index: int  # its place in the set's scoring order
    streams: list[str]  # the training streams it shares a run with
    overlap: float
    match: str | None  # a shared run, as text (None: not decoded)


class ContaminationReport(TypedDict):
    """``contamination.json`` (:func:`contamination_report`)."""

    ngram: int
    unit: str  # what an n-gram counts: words
    violation: str | None  # the first broken contract; None: every contract holds
    below_minimum: list[str]  # sets with fewer test examples than their minimum
    word_token_coverage: dict[str, float | int]
    sets: dict[str, SetSummary]
    examples: list[FlaggedExample]  # every contaminated test example


@dataclass
class SetResult:
    """One evaluation set checked against every stream."""

    name: str
    found: dict[str, np.ndarray]  # stream -> (examples,) bool: shares an n-gram with it
    overlap: np.ndarray  # (examples,) share of the example's n-grams found in any stream
    matches: list[str | None] = field(default_factory=list)  # a matched run of text, decoded

    @property
    def contaminated(self) -> np.ndarray:
        any_ = np.zeros(len(self.overlap), dtype=bool)
        for f in self.found.values():
            any_ |= f
        return any_

    def summary(self) -> SetSummary:
        return {"examples": len(self.overlap),
                "contaminated": int(self.contaminated.sum()),
                "by_stream": {s: int(f.sum()) for s, f in self.found.items()},
                "overlap_half_or_more": int((self.overlap >= 0.5).sum()),
                "mean_overlap": round(float(self.overlap.mean()), 4) if len(self.overlap) else None}


def check_set(name: str, examples: Sequence[np.ndarray], streams: dict[str, NgramIndex],
              words: Words | None = None, n: int = NGRAM) -> SetResult:
    """Which of ``examples`` (1-D arrays of word numbers) share an n-gram with each stream;
    with ``words``, the first shared run of each contaminated example as text."""
    grams, owner, length = [], [], []
    for i, ex in enumerate(examples):
        g = example_grams(ex, n)
        grams.append(g)
        owner.append(np.full(len(g), i))
        length.append(np.full(len(g), min(n, len(ex))))
    count = len(examples)
    if not count or not sum(len(g) for g in grams):
        return SetResult(name, {s: np.zeros(count, dtype=bool) for s in streams},
                         np.zeros(count), [None] * count)
    all_g, all_o, all_len = np.concatenate(grams), np.concatenate(owner), np.concatenate(length)
    hit_any = np.zeros(len(all_g), dtype=bool)
    found = {}
    for sname, index in streams.items():
        hit = np.zeros(len(all_g), dtype=bool)
        for L in np.unique(all_len):
            sel = all_len == L
            hit[sel] = index.contains(int(L), all_g[sel])
        found[sname] = np.bincount(all_o[hit], minlength=count) > 0
        hit_any |= hit
    per_example = np.bincount(all_o, minlength=count)
    overlap = np.bincount(all_o[hit_any], minlength=count) / np.maximum(per_example, 1)
    matches: list[str | None] = [None] * count
    if words is not None:
        starts = np.concatenate([np.arange(len(g)) for g in grams])
        hits = np.nonzero(hit_any)[0]
        _, first = np.unique(all_o[hits], return_index=True)  # each example's first run
        for j in hits[first]:
            i, s = int(all_o[j]), int(starts[j])
            matches[i] = words.text(examples[i][s : s + int(all_len[j])])
    return SetResult(name, found, overlap, matches)


def training_streams(tok: LLMTokenizer, words: Words, pretrain_rows: np.ndarray,
                     sft_rows: np.ndarray, task_conversations: Sequence[ConversationRow],
                     preferences: Sequence[Preference]) -> dict[str, NgramIndex]:
    """The streams an evaluation example could have leaked through.

    ``pretrain``: the pretraining rows (text and the chat mix); ``sft``: the SFT rows;
    ``align``: what DPO pairs and RL prompts are made of, the training conversations of the
    checkable tasks (the prompts and right answers of the on-policy pairs, GRPO's prompts)
    and the corpus's training pairs, prompt with chosen and with rejected reply. The SFT
    model's own rejected replies are not read: they are generated, and the model cannot leak
    what it wrote.
    """
    pairs: list[Chat] = [{"messages": [*p["prompt"], {"role": "assistant", "content": reply}]}
                         for p in preferences for reply in (p["chosen"], p["rejected"])]
    return {"pretrain": NgramIndex(words(t) for t in rows_text(tok, pretrain_rows, True)),
            "sft": NgramIndex(words(t) for t in rows_text(tok, sft_rows, False)),
            "align": NgramIndex(words(conversation_text(c))
                                for c in [*task_conversations, *pairs])}


def decontaminate(tok: LLMTokenizer, sets: Mapping[str, Sequence[str]], *,
                  train_conversations: Sequence[ConversationRow],
                  preferences: Sequence[Preference], pretrain_train: ShardDataset,
                  sft_train: ShardDataset, n: int = NGRAM) -> dict[str, SetResult]:
    """Every evaluation set (name -> its examples as text, in scoring order) checked against
    every training stream (:func:`training_streams`)."""
    words = Words()
    tasks = [c for c in train_conversations if c["task"] != "doc" and c.get("answer")]
    streams = training_streams(tok, words, pretrain_train.gather(range(len(pretrain_train)))[0],
                               sft_train.gather(range(len(sft_train)))[0], tasks, preferences)
    # every set in one check: each stream is read once per n-gram length, not once per set
    examples = {name: [words(t) for t in texts] for name, texts in sets.items()}
    together = check_set("all", [e for ex in examples.values() for e in ex], streams, words, n)
    out, start = {}, 0
    for name, ex in examples.items():
        part = slice(start, start + len(ex))
        out[name] = SetResult(name, {s: f[part] for s, f in together.found.items()},
                              together.overlap[part], together.matches[part])
        start += len(ex)
    return out


def first_violation(results: Mapping[str, SetResult],
                    tables: Mapping[str, Sequence[DocumentRow | ConversationRow | Preference]],
                    texts: Mapping[str, Sequence[str]], n: int = NGRAM) -> str | None:
    """The first broken contract as one line (None when every contract holds): a pool key in
    a training table and a held-out one, or a test example whose runs found in training
    cover ``COPY_SHARE`` or more of its own."""
    breach = pool_breach(dict(tables))
    if breach:
        return f"pool breach: {breach}"
    for name, r in results.items():
        copied = np.nonzero(r.overlap >= COPY_SHARE)[0]
        if len(copied):
            i = int(copied[0])
            streams = ", ".join(s for s, f in r.found.items() if f[i])
            text = " ".join(texts[name][i].split())[:80]
            return (f"set {name!r}: example {i} ({text!r}) shares {n}-word runs with "
                    f"training ({streams}) covering {r.overlap[i]:.0%} of its runs")
    return None


def word_token_coverage(tok: LLMTokenizer,
                        tables: Mapping[str, Sequence[DocumentRow | ConversationRow | Preference]],
                        split: str = "test") -> dict[str, float | int]:
    """How many ``split`` words of the tasks are spelled, token by token, in training.

    Spelling a word means knowing the letters of each of its BPE tokens; a model learns
    those from training words that contain the same tokens (each training reply spells its
    word). A held-out word is answerable in that sense when every one of its tokens occurs
    in some training word: the share of such words is measured here, with every word encoded
    as it stands in a question (in quotes)."""
    def words_of(name: str) -> set[str]:
        return {k.split(":", 1)[1] for row in tables.get(name, [])
                for k in row.get("pool") or () if k.startswith("word:")}

    def pieces(word: str) -> list[int]:
        # quoted, as questions write it: a quote can merge with the first letters (the
        # pre-tokenizer's contractions, 's and 't), and that token is the one to spell
        return tok.encode(f"'{word}'")

    trained = {t for w in words_of("sft_train") for t in pieces(w)}
    held = sorted(words_of(f"sft_{split}"))
    covered = sum(all(t in trained for t in pieces(w)) for w in held)
    return {"words": len(held), "covered": covered,
            "share": round(covered / len(held), 4) if held else float("nan")}


def contamination_metrics(results: dict[str, SetResult]) -> dict[str, int]:
    """``evaluate/contamination/<set>/<count>``: examples, contaminated, and by stream."""
    out = {}
    for name, r in results.items():
        s = r.summary()
        out[contamination_metric(name, "examples")] = s["examples"]
        out[contamination_metric(name, "contaminated")] = s["contaminated"]
        out.update({contamination_metric(name, st): c for st, c in s["by_stream"].items()})
    return out


def contamination_report(results: dict[str, SetResult], n: int = NGRAM, listed: int = 10,
                         violation: str | None = None,
                         coverage: Mapping[str, float | int] | None = None
                         ) -> tuple[ContaminationReport, str]:
    """(JSON-ready summary with every contaminated example, Markdown page) of :func:`check_set`
    results, with each set's contract, the verdict (``violation``: the first broken contract,
    or None) and the test words' token coverage."""
    small = [f"{name} ({len(r.overlap)} < {MIN_TEST_EXAMPLES[name]})"
             for name, r in results.items() if len(r.overlap) < MIN_TEST_EXAMPLES.get(name, 0)]
    data: ContaminationReport = {"ngram": n, "unit": "words", "violation": violation,
                                 "below_minimum": small,
                                 "word_token_coverage": dict(coverage or {}), "sets": {},
                                 "examples": []}
    streams = sorted({s for r in results.values() for s in r.found})
    verdict = (f"**Contract broken**: {violation}" if violation else
               "**Every contract holds**: no pool key is in a training table and a held-out "
               f"one, and no test example has {COPY_SHARE:.0%} or more of its {n}-word runs "
               "in a training stream.")
    sizes = ("Every test set has at least its minimum of examples." if not small else
             "Below the minimum (intervals are wide; add data): " + ", ".join(small) + ".")
    lines = ["# The split contract", "", verdict, "", sizes, "",
             "| set | test examples | minimum | contract |", "|---|---|---|---|",
             *[f"| {name} | {len(r.overlap)} | {MIN_TEST_EXAMPLES.get(name, '-')} | "
               f"{CONTRACTS.get(name, '-')} |" for name, r in results.items()], "",
             f"Test examples that share a run of {n} words with a training stream (lowercased "
             "words; special tokens and system prompts left out), listed and counted: a "
             "shared sentence is not a copy. Overlap: the share of an example's "
             f"{n}-word runs found in any stream.", "",
             "| set | examples | share a run | " + " | ".join(streams) +
             " | overlap >= 0.5 | mean overlap |",
             "|---|---|---|" + "---|" * len(streams) + "---|---|"]
    for name, r in results.items():
        s = data["sets"][name] = r.summary()
        lines.append(f"| {name} | {s['examples']} | {s['contaminated']} | " +
                     " | ".join(str(s["by_stream"][st]) for st in streams) +
                     f" | {s['overlap_half_or_more']} | {s['mean_overlap']} |")
        for i in np.nonzero(r.contaminated)[0]:
            data["examples"].append({"set": name, "index": int(i),
                                     "streams": [st for st in streams if r.found[st][i]],
                                     "overlap": round(float(r.overlap[i]), 4),
                                     "match": r.matches[i] if r.matches else None})
    if coverage and coverage.get("words"):
        lines += ["", f"Test words whose every token is spelled in some training word (what "
                  f"spelling a held-out word needs): {coverage['covered']} of "
                  f"{coverage['words']} ({coverage['share']:.1%})."]
    lines += ["", "Metrics without the examples that share a run are in metrics/evaluate.json "
              "(`*_clean`), beside the ones on every example.", ""]
    for name in results:
        flagged = [e for e in data["examples"] if e["set"] == name]
        if not flagged:
            continue
        flagged.sort(key=lambda e: -e["overlap"])
        lines += [f"## {name}: the {min(listed, len(flagged))} of {len(flagged)} with the "
                  "most overlap", "", "| example | overlap | streams | a shared run |",
                  "|---|---|---|---|"]
        for e in flagged[:listed]:
            run = (e["match"] or "").replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| {e['index']} | {e['overlap']:.2f} | {', '.join(e['streams'])} | "
                         f"`{run}` |")
        lines.append("")
    return data, "\n".join(lines)


def evaluation_sets(tasks: Mapping[str, Sequence[ConversationRow]],
                    doc_questions: Sequence[ConversationRow], documents: Sequence[str],
                    chats: Sequence[ConversationRow], preferences: Sequence[Preference]
                    ) -> dict[str, list[str]]:
    """Set name -> its test examples as the text checked (conversations as the chat
    template renders them, system prompt left out), in scoring order; empty sets left out."""
    pairs: list[Chat] = [{"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]}
                         for p in preferences]
    sets = {**{t: [conversation_text(c) for c in convs] for t, convs in tasks.items()},
            "doc_questions": [conversation_text(c) for c in doc_questions],
            "docs_test": list(documents),
            "chat_test": [conversation_text(c) for c in chats],
            "preferences_test": [conversation_text(c) for c in pairs]}
    return {k: v for k, v in sets.items() if v}


@dataclass
class Contract:
    """The contract check of one corpus and its shards: per-set results, the first
    violation (None: every contract holds), the test words' token coverage, the report."""

    checks: dict[str, SetResult]
    violation: str | None
    coverage: dict[str, float | int]  # word_token_coverage
    data: ContaminationReport
    page: str


def check_contract(tok: LLMTokenizer, corpus_dir: Path, shard_dir: Path, max_per_task: int,
                   choices: int, n: int = NGRAM) -> Contract:
    """Every evaluation set of the corpus's test split, as the evaluate stage scores it,
    checked against the pool keys of every table and against every training stream."""
    docs: dict[str, list[DocumentRow]] = {}
    sft: dict[str, list[ConversationRow]] = {}
    prefs: dict[str, list[Preference]] = {}
    for s in SPLITS:
        docs[s], sft[s] = read_documents(corpus_dir, s), read_conversations(corpus_dir, s)
        prefs[s] = read_preferences(corpus_dir, s)
    tables = {f"{t}_{s}": rows for s in SPLITS
              for t, rows in (("pretrain", docs[s]), ("sft", sft[s]), ("preferences", prefs[s]))}
    convs = sft["test"]
    sets = evaluation_sets(task_examples(convs, max_per_task),
                           doc_mc_questions(convs, choices, max_per_task),
                           [d["text"] for d in docs["test"]],
                           [c for c in convs if c["task"] == "chat"],
                           prefs["test"])
    checks = decontaminate(tok, sets, train_conversations=sft["train"],
                           preferences=prefs["train"],
                           pretrain_train=ShardDataset(shard_dir, "pretrain_train"),
                           sft_train=ShardDataset(shard_dir, "sft_train"), n=n)
    violation = first_violation(checks, tables, sets, n)
    coverage = word_token_coverage(tok, tables)
    data, page = contamination_report(checks, n, violation=violation, coverage=coverage)
    return Contract(checks, violation, coverage, data, page)
