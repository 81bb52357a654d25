"""The synthetic SFT tasks: questions whose one answer can be checked exactly.

Arithmetic (``What is 12 + 7?``), spelling a word letter by letter, counting a letter in a
word and reversing a word. Each task draws from its own seeded stream, so adding a task never
changes another's conversations; the words come from the pydoc topics
(:func:`llmcore.data.pydocs.word_list`), stable for one Python version. The same module
checks an answer (:func:`is_correct`: the reward of GRPO, the judge of on-policy DPO pairs
and of task accuracy) and makes a plausible wrong one (:func:`wrong_answer`, DPO's rejected
reply). The task names are :data:`llmcore.config.SYNTHETIC_TASKS`, the names params may use.

Trade-off: exact match is strict (``19.`` is wrong for ``19``); it is what makes the reward
checkable without a judge model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

from llmcore.config import SYNTHETIC_TASKS
from llmcore.data.corpus import Conversation
from llmcore.data.pydocs import SYSTEM_PROMPT, word_list

__all__ = ["SYNTHETIC_TASKS", "is_correct", "synthetic_conversations", "wrong_answer"]


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


def _synthetic_conversation(task: str, rng: random.Random, words: list[str]) -> Conversation:
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.2:
        turns.append(("system", SYSTEM_PROMPT))
    n_turns = 2 if rng.random() < 0.2 else 1
    answer = ""
    for _ in range(n_turns):
        q, answer = _synthetic_one(task, rng, words)
        turns += [("user", q), ("assistant", answer)]
    return Conversation(tuple(turns), f"builtin:synthetic/{task}", task, answer)


def synthetic_conversations(per_task: int, seed: int, val_per_task: int = 0
                            ) -> Iterator[Conversation]:
    """Tasks with one exactly checkable answer. A fifth have a system prompt, a fifth two turns.

    With ``val_per_task``, each task also gets that many held-out conversations from a stream
    of their own, each kept only if it is not one of the training conversations, so that every
    task is measured on the same number of examples. (Without it the corpus's hash split
    decides, and the duplicates it drops thin the held-out set of the smaller tasks.) A
    held-out question can still reuse a word or a product the model has seen in another
    training conversation: spelling a word it was never shown is not what these tasks ask.
    """
    words = word_list()
    for task in SYNTHETIC_TASKS:
        rng = random.Random(f"{seed}:{task}")
        train = [_synthetic_conversation(task, rng, words) for _ in range(per_task)]
        if not val_per_task:
            yield from train
            continue
        yield from (replace(c, split="train") for c in train)
        seen = {c.messages for c in train}
        val_rng, made = random.Random(f"{seed}:{task}:val"), 0
        for _ in range(50 * val_per_task):  # bounded: a small task space can run out
            c = _synthetic_conversation(task, val_rng, words)
            if c.messages not in seen:
                seen.add(c.messages)
                made += 1
                yield replace(c, split="val")
                if made == val_per_task:
                    break


def is_correct(reply: str, answer: str) -> bool:
    """The synthetic tasks' check: the reply is exactly the answer (outer spaces ignored)."""
    return reply.strip() == answer.strip()


def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same shape (never equal to ``answer``)."""
    for _ in range(20):
        if task in ("arithmetic", "count") and answer.lstrip("-").isdigit():
            value = int(answer) + rng.choice([-1, 1]) * rng.randint(1, 3 if task == "count" else 10)
            candidate = str(max(value, 0)) if task == "count" else str(value)
        elif len(answer) >= 2:
            chars = list(answer)
            i = rng.randrange(len(chars) - 1)
            if rng.random() < 0.5:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]  # swap two neighbours
            else:
                del chars[i]  # drop one
            candidate = "".join(chars)
        else:
            candidate = answer + answer
        if candidate.strip() != answer.strip():
            return candidate
    return answer + "?"
