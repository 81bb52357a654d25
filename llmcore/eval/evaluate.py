"""Evaluation: bits per byte, length extrapolation, task accuracy, samples.

All functions take a model and data and return plain dicts; the evaluate stage writes them.

* Bits per byte on held-out rows (pretraining text, or SFT rows on their masked tokens) via
  :func:`llmcore.model.loss.heldout_loss`; :func:`split_bpb` is the number the model registry
  ranks by.
* Length extrapolation: the same held-out text re-cut into windows of 1x, 2x, 4x the training
  context. RoPE keeps working past the trained length (somewhat); a learned position table has
  rows that training never touched, so its loss blows up there.
* Task accuracy on held-out SFT conversations, for any model prompted with the chat template:
  exact match of the greedy reply on the synthetic tasks (arithmetic, spelling, counting,
  reversing), a likelihood multiple choice on the doc questions (the documented answer against
  answers to other questions, scored by mean log-probability per token), and how often a reply
  ends with ``<|im_end|>`` within the token budget.

Trade-off: multiple choice by length-normalised likelihood favours short fluent distractors a
little; it needs no generation and no judge, and it separates a model that read the docs from
one that did not. The documented answer sits at a seeded random position among distractors
that differ from it (and from each other) as text, and a tie among the best ``k`` candidates
earns ``1/k``: a model with no preference scores chance, not a win (it used to, with the
answer always first and ``max`` keeping the first of equal scores).
"""

from __future__ import annotations

import functools
import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from llmcore.data.corpus import ConversationRow, expected_answer
from llmcore.data.shards import ShardDataset
from llmcore.data.tasks import is_correct
from llmcore.data.tokenizer import IM_END, LLMTokenizer, render_chat
from llmcore.infer.generate import Sampling, generate
from llmcore.metric_keys import (
    DOCS_BPB,
    IM_END_RATE,
    MULTI,
    SFT_BPB,
    SINGLE,
    bpb_at_context,
    exact_match,
    model_metric,
)
from llmcore.model.loss import heldout_loss
from llmcore.model.protocols import LanguageModel

# A flat metric name -> value (``evaluate/<model>/<metric>``); None where nothing was measured
Metrics = dict[str, float | None]


class TaskResult(TypedDict):
    """One synthetic task's score (:func:`task_accuracy`), the examples in
    :func:`task_examples` order."""

    exact_match: float
    im_end_rate: float
    n: int
    ci95: tuple[float, float]
    correct: list[bool]
    pieces: list[int | None]  # the question's word in tokens (:func:`word_pieces`)
    replies: list[str]


class DocMCResult(TypedDict):
    """The doc multiple choice's score (:func:`doc_multiple_choice`)."""

    accuracy: float
    n: int
    chance: float
    ci95: tuple[float, float]
    correct: list[float]  # each question's credit in [0, 1]


class ModelResults(TypedDict):
    """Everything :func:`evaluate_model` measures of one model."""

    contexts: dict[int, dict[str, float] | None]  # factor -> heldout_loss (None: cannot run)
    sft: dict[str, float]
    tasks: dict[str, TaskResult]
    doc_mc: DocMCResult
    samples: list[str]


class DrawnSample(TypedDict):
    """One test question drawn for the README (:func:`drawn_samples`)."""

    task: str
    question: str
    reply: str
    answer: str
    correct: bool
    pieces: int | None


def bpb_at_contexts(model: LanguageModel, ds: ShardDataset, token_bytes: torch.Tensor, factors: Sequence[int],
                    batch_size: int, max_rows: int | None, device: torch.device,
                    dtype: torch.dtype) -> dict[int, dict[str, float] | None]:
    """Bits per byte with windows of ``factor x`` the training context (None if it cannot run)."""
    seq_len = ds.row_len - 1
    rows = min(len(ds), max_rows or len(ds))
    out: dict[int, dict[str, float] | None] = {}
    for f in factors:
        window = f * seq_len
        if model.cfg.positions == "learned" and window > model.cfg.max_seq_len:
            out[f] = None  # past the position table: the model cannot even run
            continue
        if (rows * seq_len) // window == 0:
            out[f] = None  # not enough held-out text for one window
            continue
        per_batch = max(1, batch_size // f)
        out[f] = heldout_loss(model, ds, per_batch, -(-rows // per_batch), token_bytes, device, dtype,
                          seq_len=None if f == 1 else window)
    return out


def split_bpb(model: LanguageModel, ds: ShardDataset, token_bytes: torch.Tensor, batch_size: int = 16
              ) -> float:
    """Bits per byte on every row of ``ds`` in full precision (what the registry ranks by).

    fp32, not the run's autocast dtype: the ranking then does not depend on which machine
    computed it, and quantized models are compared in their stored precision.
    """
    device = next(model.parameters()).device
    return heldout_loss(model, ds, batch_size, -(-len(ds) // batch_size), token_bytes, device,
                        torch.float32)["bpb"]


def _prompt_ids(tok: LLMTokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    return tok.encode(render_chat(messages, add_generation_prompt=True))


def task_examples(conversations: Sequence[ConversationRow], max_per_task: int
                  ) -> dict[str, list[ConversationRow]]:
    """The held-out conversations each synthetic task is scored on: the first
    ``max_per_task`` of each, in corpus order (the same ones for every model and check)."""
    by_task: dict[str, list[ConversationRow]] = defaultdict(list)
    for conv in conversations:
        task = conv["task"]
        if task != "doc" and conv.get("answer") is not None and \
                len(by_task[task]) < max_per_task:
            by_task[task].append(conv)
    return dict(sorted(by_task.items()))


def doc_questions(conversations: Sequence[ConversationRow]) -> list[ConversationRow]:
    """Every held-out doc question with a documented answer (the multiple choice's pool)."""
    return [c for c in conversations if c["task"] == "doc" and c.get("answer")]


def task_accuracy(model: LanguageModel, tok: LLMTokenizer, conversations: Sequence[ConversationRow],
                  max_per_task: int, max_new_tokens: int, batch_size: int = 32
                  ) -> dict[str, TaskResult]:
    """Exact match and ``<|im_end|>`` rate per synthetic task on held-out conversations, with
    each example's outcome (``correct``, in :func:`task_examples` order)."""
    results: dict[str, TaskResult] = {}
    stops = [tok.im_end_id, tok.eot_id]
    for task, convs in task_examples(conversations, max_per_task).items():
        correct: list[bool] = []
        replies: list[str] = []
        ended = 0
        for i in range(0, len(convs), batch_size):
            chunk = convs[i : i + batch_size]
            prompts = [_prompt_ids(tok, c["messages"][:-1]) for c in chunk]
            outs = generate(model, prompts, Sampling(max_new_tokens=max_new_tokens), stops,
                            pad_id=tok.pad_id, keep_stop=True)
            for conv, ids in zip(chunk, outs, strict=True):
                stopped = bool(ids) and ids[-1] == tok.im_end_id
                reply = tok.decode(ids[:-1] if ids and ids[-1] in stops else ids).strip()
                correct.append(is_correct(reply, expected_answer(conv)))
                replies.append(reply)
                ended += stopped
        right = sum(correct)
        results[task] = {"exact_match": right / len(convs), "im_end_rate": ended / len(convs),
                         "n": len(convs), "ci95": wilson_interval(right, len(convs)),
                         "correct": correct, "pieces": [word_pieces(tok, c) for c in convs],
                         "replies": replies}
    return results


def drawn_samples(tasks: Mapping[str, TaskResult], conversations: Sequence[ConversationRow],
                  per_task: int, seed: int = 0) -> list[DrawnSample]:
    """``per_task`` scored questions of each task drawn at random (seeded, not picked by
    hand), with the model's reply, the right answer and whether it counted: what a reader
    sees of the model on questions it never trained on. ``tasks``: :func:`task_accuracy`'s
    result on ``conversations``."""
    examples = task_examples(conversations, max(len(v["correct"]) for v in tasks.values()))
    rng = random.Random(f"samples:{seed}")
    drawn: list[DrawnSample] = []
    for task, v in sorted(tasks.items()):
        for i in sorted(rng.sample(range(len(v["correct"])), min(per_task, len(v["correct"])))):
            conv = examples[task][i]
            drawn.append({"task": task, "question": conv["messages"][-2]["content"],
                          "reply": v["replies"][i], "answer": expected_answer(conv),
                          "correct": bool(v["correct"][i]), "pieces": v["pieces"][i]})
    return drawn


def word_pieces(tok: LLMTokenizer, conv: ConversationRow) -> int | None:
    """Tokens of a word question's word as the question quotes it (``'python'``); None for a
    question about no word. One token: spelling it recalls that token's letters; more:
    it composes the letters of several tokens."""
    words = [k.split(":", 1)[1] for k in conv.get("pool") or () if k.startswith("word:")]
    if not words:
        return None
    return len(tok.encode(f" '{words[-1]}'.")) - 2  # the quote pieces " '" and "'." off


def by_pieces(result: TaskResult) -> dict[str, tuple[float, int]]:
    """A word task's exact match on single-token and on multi-token words: kind ->
    (successes, n). Empty for a task whose questions are about no word."""
    out: dict[str, list[int]] = {}
    for ok, n in zip(result.get("correct") or (), result.get("pieces") or (), strict=False):
        if n is not None:
            out.setdefault(SINGLE if n == 1 else MULTI, []).append(int(ok))
    return {k: (sum(v), len(v)) for k, v in sorted(out.items())}


@torch.no_grad()
def _mean_logprob(model: LanguageModel, prompt: list[int], candidates: list[list[int]], pad_id: int,
                  max_len: int) -> list[float]:
    """Mean log-probability per token of each candidate after ``prompt``, in one batch.

    A candidate keeps its first ``max(1, max_len - len(prompt))`` tokens and the sequence is
    then cut from the left to ``max_len``: a prompt of ``max_len`` tokens or more loses its
    start and every candidate is scored on its first token alone. The mask covers exactly the
    kept candidate tokens (those with a token before them to predict them from).
    """
    seqs: list[list[int]] = []
    kept: list[int] = []
    for cand in candidates:
        cand = cand[: max(1, max_len - len(prompt))]
        seq = (prompt + cand)[-max_len:]
        seqs.append(seq)
        kept.append(min(len(cand), len(seq) - 1))
    longest = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest)
    for i, (s, n) in enumerate(zip(seqs, kept, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, len(s) - n : len(s)] = 1.0
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids[:, :-1]).float()
    logp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                            reduction="none").view(len(seqs), -1)
    m = mask[:, 1:]
    return ((logp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()


# Scores within this (relative, and absolute near 0) count as tied. They are float32
# reductions: scores equal in exact arithmetic come out a few ulps apart (the mean of n equal
# log-probabilities -5.7037826 reads -5.7037816 for some n, 1.7e-7 relative), so an exact
# comparison (or 1e-9, below float32's 1.2e-7 resolution) would give one of them the whole
# credit by rounding. 1e-5 is ~80 ulps: above the rounding of these short sums, and far below
# any preference a model expresses (1e-5 x |score| nats per token: a probability ratio within
# 1.0001 per token for mean log-probabilities above -10).
TIE_TOL = 1e-5


def choice_credit(scores: Sequence[float], gold: int, tol: float = TIE_TOL) -> float:
    """A multiple-choice question's credit: ``1/k`` when ``gold`` is among the ``k`` candidates
    tied (within ``tol``) for the highest score, else 0. So a model indifferent among all
    ``c`` candidates earns exactly chance, ``1/c``, per question. NaN scores are never the
    best; with every score NaN the credit is 0 (a broken model does not earn chance)."""
    if not 0 <= gold < len(scores):
        raise IndexError(f"gold index {gold} for {len(scores)} candidates")
    best = max((s for s in scores if not math.isnan(s)), default=math.nan)
    if math.isnan(best):
        return 0.0
    tied = [i for i, s in enumerate(scores) if math.isclose(s, best, rel_tol=tol, abs_tol=tol)]
    return 1.0 / len(tied) if gold in tied else 0.0


class MCItem(NamedTuple):
    """One doc multiple-choice question: the conversation, its candidate answers (the
    documented one among them) and the documented answer's index in ``candidates``."""

    conv: ConversationRow
    candidates: tuple[str, ...]
    gold: int


def normalise_answer(text: str) -> str:
    """What two answers must differ in to be different candidates: the text stripped, its
    whitespace runs collapsed to one space, casefolded."""
    return " ".join(text.split()).casefold()


def doc_mc_items(conversations: Sequence[ConversationRow], choices: int, max_questions: int,
                 seed: int = 0) -> list[MCItem]:
    """The doc multiple choice: the first ``max_questions`` of :func:`doc_questions`, each with
    ``choices - 1`` distractors and its documented answer at a random position.

    Distractors are answers to other questions, distinct from the documented answer and from
    each other as :func:`normalise_answer` text (each distinct answer spelled as it first
    appears); one ``random.Random(seed)`` draws them and the answer's position, question by
    question, so every model and tool (the harness tasks too) sees the same items. Every
    question's answer is in the pool of distinct answers, so each has the same number of
    distractors to draw from: with fewer than ``choices`` distinct answers in all, no question
    can be asked and the set is empty (no question is skipped alone, so the items stay in
    :func:`doc_questions` order, the order per-question flags such as contamination use).
    """
    docs = doc_questions(conversations)
    pool: dict[str, str] = {}
    for d in docs:
        pool.setdefault(normalise_answer(expected_answer(d)), expected_answer(d))
    if len(pool) < choices:
        return []
    rng = random.Random(seed)
    items = []
    for conv in docs[:max_questions]:
        key = normalise_answer(expected_answer(conv))
        candidates = rng.sample([a for k, a in pool.items() if k != key], choices - 1)
        gold = rng.randrange(choices)
        candidates.insert(gold, expected_answer(conv))
        items.append(MCItem(conv, tuple(candidates), gold))
    return items


def doc_mc_questions(conversations: Sequence[ConversationRow], choices: int, max_questions: int,
                     seed: int = 0) -> list[ConversationRow]:
    """The doc questions the multiple choice scores, in its order (the contract check's set)."""
    return [item.conv for item in doc_mc_items(conversations, choices, max_questions, seed)]


def doc_multiple_choice(model: LanguageModel, tok: LLMTokenizer,
                        conversations: Sequence[ConversationRow], choices: int,
                        max_questions: int, seed: int = 0) -> DocMCResult:
    """Accuracy of picking the documented answer among ``choices`` candidates
    (:func:`doc_mc_items`), scored by mean log-probability per token of the candidate and its
    ``<|im_end|>``.

    ``correct`` holds each question's credit in [0, 1] (:func:`choice_credit`: 1, 0, or
    ``1/k`` for a ``k``-way tie with the answer), ``accuracy`` their mean, and ``ci95`` the
    Wilson interval of the credit sum over ``n``: a credit in [0, 1] with mean ``p`` has at
    most the variance ``p(1 - p)`` of a 0/1 outcome, so the interval is conservative, and it
    equals the usual one when there are no ties.
    """
    items = doc_mc_items(conversations, choices, max_questions, seed)
    if not items:
        return {"accuracy": float("nan"), "n": 0, "chance": 1.0 / choices,
                "ci95": (float("nan"), float("nan")), "correct": []}
    max_len = model.cfg.max_seq_len
    credit: list[float] = []
    for item in items:
        prompt = _prompt_ids(tok, item.conv["messages"][:-1])
        cand_ids = [tok.encode(a + IM_END) for a in item.candidates]
        scores = _mean_logprob(model, prompt, cand_ids, tok.pad_id, max_len)
        credit.append(choice_credit(scores, item.gold))
    total = sum(credit)
    return {"accuracy": total / len(items), "n": len(items),
            "chance": 1.0 / choices, "ci95": wilson_interval(total, len(items)),
            "correct": credit}


def answer_prompts(model: LanguageModel, tok: LLMTokenizer, prompts: Sequence[str], max_new_tokens: int
                   ) -> list[str]:
    """Greedy replies to single-turn chat prompts."""
    ids = [_prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
    outs = generate(model, ids, Sampling(max_new_tokens=max_new_tokens),
                    [tok.im_end_id, tok.eot_id], pad_id=tok.pad_id)
    return [tok.decode(o).strip() for o in outs]


class EvalSettings(Protocol):
    """What :func:`evaluate_model` reads of the ``evaluate:`` section
    (:class:`llmcore.config.evaluate.EvaluateConfig` is one), named here so that the training
    stages, which score tasks with this module too, do not depend on that section."""

    @property
    def context_factors(self) -> Sequence[int]: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def max_rows(self) -> int | None: ...
    @property
    def max_task_examples(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def choices(self) -> int: ...
    @property
    def prompts(self) -> Sequence[str]: ...


def evaluate_model(model: LanguageModel, tok: LLMTokenizer, *, docs: ShardDataset,
                   replies: ShardDataset, conversations: Sequence[ConversationRow],
                   token_bytes: torch.Tensor, cfg: EvalSettings, device: torch.device,
                   dtype: torch.dtype) -> ModelResults:
    """Everything the evaluate stage reports for one model, as a nested dict: bits per byte
    on ``docs`` (pretraining rows) and on ``replies`` (SFT rows), the tasks and the multiple
    choice on ``conversations``, and the samples. The stage passes the test split."""
    ctx = bpb_at_contexts(model, docs, token_bytes, cfg.context_factors, cfg.batch_size,
                          cfg.max_rows, device, dtype)
    rows = min(len(replies), cfg.max_rows or len(replies))
    sft = heldout_loss(model, replies, cfg.batch_size, -(-rows // cfg.batch_size), token_bytes,
                       device, dtype)
    tasks = task_accuracy(model, tok, conversations, cfg.max_task_examples, cfg.max_new_tokens)
    mc = doc_multiple_choice(model, tok, conversations, cfg.choices, cfg.max_task_examples)
    samples = answer_prompts(model, tok, cfg.prompts, cfg.max_new_tokens)
    return {"contexts": ctx, "sft": sft, "tasks": tasks, "doc_mc": mc, "samples": samples}


def summary_metrics(results: Mapping[str, ModelResults], factors: Sequence[int]) -> Metrics:
    """Flat ``evaluate/<model>/<metric>`` numbers of :func:`evaluate_model` results.

    NaN (nothing to measure, e.g. an empty split) becomes None, which JSON and DVC show as
    empty rather than as an invalid number.
    """
    metrics: Metrics = {}
    for name, r in results.items():
        key = functools.partial(model_metric, name)
        metrics[key(DOCS_BPB)] = r["contexts"][1]["bpb"] if r["contexts"][1] else None
        metrics[key(SFT_BPB)] = r["sft"]["bpb"]
        metrics[key("sft_loss")] = r["sft"]["loss"]
        for f in factors:
            at = r["contexts"][f]
            metrics[key(bpb_at_context(f))] = at["bpb"] if at else None
        metrics.update(task_metrics(name, r["tasks"]))
        n = sum(v["n"] for v in r["tasks"].values())
        metrics[key(IM_END_RATE)] = sum(v["im_end_rate"] * v["n"]
                                        for v in r["tasks"].values()) / max(n, 1)
        metrics[key("doc_mc_accuracy")] = r["doc_mc"]["accuracy"]
        metrics[key("doc_mc_accuracy_ci95_low")] = r["doc_mc"]["ci95"][0]
        metrics[key("doc_mc_accuracy_ci95_high")] = r["doc_mc"]["ci95"][1]
        metrics[key("doc_mc_n")] = r["doc_mc"]["n"]
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def task_metrics(model: str, tasks: Mapping[str, TaskResult]) -> Metrics:
    """``evaluate/<model>/<task>_exact_match`` with its interval and n, and for a word task the
    same on single-token and on multi-token words (``<task>_multi_exact_match``...); ``model``
    may be :data:`llmcore.metric_keys.VAL`."""
    metrics: Metrics = {}
    for task, v in tasks.items():
        em = model_metric(model, exact_match(task))
        metrics[em] = v["exact_match"]
        metrics[f"{em}_ci95_low"] = v["ci95"][0]
        metrics[f"{em}_ci95_high"] = v["ci95"][1]
        metrics[model_metric(model, f"{task}_n")] = v["n"]
        for kind, (right, n) in by_pieces(v).items():
            low, high = wilson_interval(right, n)
            em = model_metric(model, exact_match(task, kind))
            metrics[em] = right / n
            metrics[f"{em}_ci95_low"] = low
            metrics[f"{em}_ci95_high"] = high
            metrics[model_metric(model, f"{task}_{kind}_n")] = n
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}


def clean_metrics(results: Mapping[str, ModelResults],
                  contaminated: Mapping[str, Sequence[bool] | np.ndarray]) -> Metrics:
    """``evaluate/<model>/<metric>_clean`` (with its interval and ``_clean_n``): each accuracy
    on the examples not flagged in ``contaminated`` (set name -> one flag per example, in
    scoring order: the tasks by name, ``doc_questions``). None where no example is left."""
    metrics: Metrics = {}
    for name, r in results.items():
        scored: list[tuple[str, str, Sequence[float]]] = [
            (exact_match(t), t, v["correct"]) for t, v in r["tasks"].items()]
        scored.append(("doc_mc_accuracy", "doc_questions", r["doc_mc"]["correct"]))
        for metric, set_name, correct in scored:
            flags = list(contaminated.get(set_name, [False] * len(correct)))
            if len(flags) != len(correct):
                raise ValueError(f"{set_name}: {len(flags)} contamination flags for "
                                 f"{len(correct)} scored examples")
            kept = [c for c, f in zip(correct, flags, strict=True) if not f]
            low, high = wilson_interval(sum(kept), len(kept))
            clean = model_metric(name, f"{metric}_clean")
            metrics[clean] = sum(kept) / len(kept) if kept else None
            metrics[f"{clean}_ci95_low"] = None if math.isnan(low) else round(low, 5)
            metrics[f"{clean}_ci95_high"] = None if math.isnan(high) else round(high, 5)
            metrics[f"{clean}_n"] = len(kept)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion ``successes / n`` (``successes``
    may be a sum of fractional credits in [0, 1], as the doc multiple choice's ties give).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0 or n successes
    and small n, which is where task accuracies of small models live.
    """
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))
