"""Decontamination: which evaluation examples also appear, nearly verbatim, in training data.

A held-out question is only held out if the model never read it. Here it could have leaked
through three streams: the pretraining rows (which carry SFT conversations too, the chat mix),
the SFT rows, and the DPO pairs (and the GRPO prompts, drawn from the same training
conversations). An example is *contaminated* by a stream when it shares a run of ``n`` words
(13 by default, the rule of the GPT-3 paper) with it.

* Words, not tokens: runs of letters, digits and underscores, lowercased (punctuation, spacing
  and case do not hide a copy). 13 tokens of this tokenizer are three or four English words and
  every answer of the spelling tasks is one token per letter, so token 13-grams flag shared
  phrases of the question templates; 13 words is a sentence. The streams are the pack stage's
  rows, decoded: exactly what the model trained on. Special tokens become line breaks on both
  sides; an example's system prompt is left out (a fixed sentence shared by a fifth of all
  conversations would match everything).
* An example shorter than ``n`` words is checked whole: contaminated if it appears as one run.
  Most task questions with their replies are 14-27 words, so they match where the same
  question with its reply was trained on.
* Each example also gets its *overlap*: the share of its n-grams found in any stream. One
  shared run flags a sentence of boilerplate; an overlap near 1 means the example itself was
  trained on.
* n-grams are 64-bit polynomial hashes over word numbers, computed with NumPy's wrapping uint64
  arithmetic (two different n-grams collide with probability ~2^-64 per pair).

Trade-offs: exact n-grams miss paraphrases and do not know which overlaps matter: two doc
answers that share a sentence of boilerplate count as a leak. The counts are an upper bound,
and the overlap share tells a copied example from one that shares a phrase.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import SPECIAL_TOKENS, LLMTokenizer, render_chat
from llmcore.report.evaluate import doc_questions, task_examples

NGRAM = 13
_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication mod 2^64 mixes every bit
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_WORD = re.compile(r"\w+")


def gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every window of ``n`` numbers of the 1-D ``ids`` (empty if it is shorter)."""
    count = len(ids) - n + 1
    if count <= 0 or n <= 0:
        return np.empty(0, dtype=np.uint64)
    x = ids.astype(np.uint64) + np.uint64(1)  # + 1: word 0 still moves the hash
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * _P + x[k : k + count]  # wraps mod 2^64, which is the hash's arithmetic
    return h


class Words:
    """Text -> word numbers, one numbering shared by the streams and the examples."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, text: str) -> np.ndarray:
        out = []
        for w in _WORD.findall(_SPECIAL.sub("\n", text).lower()):
            i = self.numbers.get(w)
            if i is None:
                i = self.numbers[w] = len(self.names)
                self.names.append(w)
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    def text(self, ids: Sequence[int] | np.ndarray) -> str:
        return " ".join(self.names[int(i)] for i in ids)


def conversation_text(conv: dict[str, Any]) -> str:
    """A conversation as the model read it in training (the chat template), system prompt left
    out."""
    return render_chat([m for m in conv["messages"] if m["role"] != "system"])


class NgramIndex:
    """The set of n-gram hashes of one training stream, for every length asked of it.

    ``segments`` are 1-D arrays of word numbers whose n-grams count (a stream of rows joined,
    or one array per conversation); no n-gram crosses from one segment into the next.
    """

    def __init__(self, segments: Iterable[np.ndarray]) -> None:
        self.segments = [s for s in segments if len(s)]
        self.words = sum(len(s) for s in self.segments)
        self._sets: dict[int, np.ndarray] = {}

    def hashes(self, length: int) -> np.ndarray:
        """Sorted unique hashes of every ``length``-gram (built once per length)."""
        if length not in self._sets:
            parts = [gram_hashes(s, length) for s in self.segments]
            self._sets[length] = (np.unique(np.concatenate(parts)) if parts
                                  else np.empty(0, dtype=np.uint64))
        return self._sets[length]


def rows_text(tok: LLMTokenizer, rows: np.ndarray, shared_token: bool) -> list[str]:
    """A split's token rows as text: pretraining rows are one stream cut into windows that
    share a token (joined back, so a run across a row boundary counts); SFT rows are each
    their own packed conversations."""
    if shared_token:
        return [tok.decode(np.concatenate([rows[0], rows[1:, 1:].reshape(-1)]).tolist())] \
            if len(rows) else []
    return [tok.decode(r.tolist()) for r in rows]


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

    def summary(self) -> dict[str, Any]:
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
        g = gram_hashes(ex, n) if len(ex) >= n else gram_hashes(ex, len(ex))
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
            hit[sel] = np.isin(all_g[sel], index.hashes(int(L)))
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
                     sft_rows: np.ndarray, task_conversations: Sequence[dict[str, Any]],
                     preferences: Sequence[dict[str, Any]]) -> dict[str, NgramIndex]:
    """The three streams an evaluation example could have leaked through.

    ``pretrain``: the pretraining rows (text and the chat mix); ``sft``: the SFT rows;
    ``dpo``: what preference pairs are made of, the training conversations of the checkable
    tasks (the prompts and right answers of the on-policy pairs, and GRPO's prompts) and the
    corpus's pairs, prompt with chosen and with rejected reply. The SFT model's own rejected
    replies are not read: they are generated, and the model cannot leak what it wrote.
    """
    pairs = [{"messages": [*p["prompt"], {"role": "assistant", "content": reply}]}
             for p in preferences for reply in (p["chosen"], p["rejected"])]
    return {"pretrain": NgramIndex(words(t) for t in rows_text(tok, pretrain_rows, True)),
            "sft": NgramIndex(words(t) for t in rows_text(tok, sft_rows, False)),
            "dpo": NgramIndex(words(conversation_text(c))
                              for c in [*task_conversations, *pairs])}


def decontaminate(tok: LLMTokenizer, *, val_conversations: Sequence[dict[str, Any]],
                  train_conversations: Sequence[dict[str, Any]],
                  preferences: Sequence[dict[str, Any]], pretrain_train: ShardDataset,
                  sft_train: ShardDataset, pretrain_val: ShardDataset, max_per_task: int,
                  max_rows: int | None = None, n: int = NGRAM) -> dict[str, SetResult]:
    """Every evaluation set checked against every training stream.

    The sets are the examples the evaluate stage scores, in its order: each synthetic task
    (:func:`task_examples`), ``doc_questions`` (the multiple choice's questions with their
    documented answers) and ``docs_val`` (each of the first ``max_rows`` rows of the held-out
    pretraining text, the rows bits per byte is measured on).
    """
    words = Words()
    tasks = [c for c in train_conversations if c["task"] != "doc" and c.get("answer")]
    streams = training_streams(tok, words, pretrain_train.gather(range(len(pretrain_train)))[0],
                               sft_train.gather(range(len(sft_train)))[0], tasks, preferences)
    sets = {t: [words(conversation_text(c)) for c in convs]
            for t, convs in task_examples(val_conversations, max_per_task).items()}
    sets["doc_questions"] = [words(conversation_text(c))
                             for c in doc_questions(val_conversations)[:max_per_task]]
    val_rows = min(len(pretrain_val), max_rows or len(pretrain_val))
    sets["docs_val"] = [words(t) for t in
                        rows_text(tok, pretrain_val.gather(range(val_rows))[0], False)]
    return {name: check_set(name, ex, streams, words, n) for name, ex in sets.items()}


def contamination_metrics(results: dict[str, SetResult]) -> dict[str, int]:
    """``evaluate/contamination/<set>/<count>``: examples, contaminated, and by stream."""
    out = {}
    for name, r in results.items():
        s = r.summary()
        out[f"evaluate/contamination/{name}/examples"] = s["examples"]
        out[f"evaluate/contamination/{name}/contaminated"] = s["contaminated"]
        out.update({f"evaluate/contamination/{name}/{st}": c for st, c in s["by_stream"].items()})
    return out


def contamination_report(results: dict[str, SetResult], n: int = NGRAM, listed: int = 10
                         ) -> tuple[dict[str, Any], str]:
    """(JSON-ready summary with every contaminated example, Markdown page) of :func:`check_set`
    results."""
    data: dict[str, Any] = {"ngram": n, "unit": "words", "sets": {}, "examples": []}
    streams = sorted({s for r in results.values() for s in r.found})
    lines = ["# Contamination", "",
             f"Evaluation examples that share a run of {n} words with a training stream "
             "(lowercased words; special tokens and system prompts left out). Overlap: the "
             f"share of an example's {n}-word runs found in any stream. docs_val: one example "
             "per held-out pretraining row.", "",
             "| set | examples | contaminated | " + " | ".join(streams) +
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
    lines += ["", "Metrics without the contaminated examples are in metrics/evaluate.json "
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
