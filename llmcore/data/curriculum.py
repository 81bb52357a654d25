"""The letters curriculum mixed into the SFT training conversations (the pack stage's step),
and the compound-word questions GRPO may practise on (the rl stage's ``rl.words``).

The conversations themselves are :func:`llmcore.data.tasks.letters_conversations`; this
module decides how many there are and where they go, once the tokenizer (whose pieces they
spell) exists.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence

from llmcore.data.corpus import ConversationRow
from llmcore.data.tasks import (
    WORD_TASKS,
    compound_words,
    letter_pieces,
    letters_conversations,
    word_question,
)

__all__ = ["compound_task_rows", "held_out_words", "mix_letters"]


def held_out_words(convs: Mapping[str, Sequence[ConversationRow]]) -> set[str]:
    """The words the val and test task questions are about (their ``word:`` pool keys):
    what no curriculum piece or compound may be, or come near."""
    return {k.split(":", 1)[1] for s in ("val", "test") for c in convs.get(s, ())
            for k in c.get("pool") or () if k.startswith("word:")}


def mix_letters(train: list[list[dict[str, str]]], vocab: Iterable[str],
                held_out: Collection[str], share: float) -> tuple[int, int]:
    """Mix the letters curriculum into ``train`` (conversations as message lists, in place):
    ``share`` of the result comes from :func:`letters_conversations` over the pieces of
    ``vocab`` (:func:`letter_pieces`, never a ``held_out`` word; its compounds never near
    one), spread evenly through it so that every stretch of packed rows has its share.
    Returns (pieces, conversations added)."""
    if share <= 0 or not train:
        return 0, 0
    pieces = letter_pieces(vocab, held_out)
    n = round(len(train) * share / (1 - share)) if pieces else 0
    added = [c.as_dicts() for c in letters_conversations(pieces, n, seed=0, held_out=held_out)]
    mixed: list[list[dict[str, str]]] = []
    for i, conv in enumerate(train):
        mixed.append(conv)
        mixed.extend(added[i * n // len(train): (i + 1) * n // len(train)])
    train[:] = mixed
    return len(pieces), n


def compound_task_rows(counts: Mapping[str, int], vocab: Iterable[str],
                       held_out: Collection[str], seed: int) -> list[ConversationRow]:
    """``counts[task]`` questions of each word task (spell, count, reverse) about compounds
    (:func:`compound_words`: two or three vocabulary pieces joined, never near a
    ``held_out`` word), as corpus rows with their answers.

    Why GRPO wants them: SFT has spelled the training words until it answers nearly all of
    them, and a group of replies that are all right has no advantage to learn from. A
    compound is a string no training stream spelled, so the model must compose the letters
    of its pieces, as it must for a held-out word, and gets some right and some wrong."""
    pieces = letter_pieces(vocab, held_out)
    # pack's curriculum draws its compounds with seed 0: another seed, other strings
    words = compound_words(pieces, held_out, seed)
    rng = random.Random(f"{seed}:compound-questions")
    rows: list[ConversationRow] = []
    for task in WORD_TASKS:
        for i in range(counts.get(task, 0)):
            word = next(words, None)
            if word is None:  # too few pieces, or all too close to held-out words
                return rows
            q, reply, answer = word_question(task, word, rng)
            rows.append({"id": f"compound-{task}-{i}", "task": task, "answer": answer,
                         "messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": reply}],
                         "source": "builtin:compounds", "pool": [f"compound:{word}"]})
    return rows

