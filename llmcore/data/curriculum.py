"""The letters curriculum: what it asks (:func:`letters_conversations`: the letters of each
vocabulary piece, and word tasks about compounds of pieces), how much of it the SFT training
conversations get (:func:`mix_letters`, the pack stage's step, once the tokenizer whose pieces
it spells exists), and the compound-word questions GRPO may practise on (the rl stage's
``rl.words``).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from llmcore.data.corpus import Conversation, ConversationRow
from llmcore.data.tasks import WORD_TASKS, spelled, word_question

__all__ = ["compound_task_rows", "compound_words", "held_out_words", "letter_pieces",
           "letters_conversations", "mix_letters"]

# the questions of the letters curriculum (one vocabulary piece spelled; training only)
LETTERS_TEMPLATES = ("Which letters make up '{w}'?", "Spell '{w}'.")

# share of the letters curriculum asking a word task about a compound of pieces
COMPOUND_SHARE = 0.5


def letter_pieces(vocab: Iterable[str], held_out: Collection[str]) -> list[str]:
    """The vocabulary's pieces a quoted word is made of, minus the held-out words.

    A word in quotes (``'python'``) is encoded as pieces without a leading space, so those
    are the ones whose letters a model must know to spell any word: the lowercase ASCII
    alphabetic pieces of ``vocab`` (its tokens as text), sorted. A piece that is a held-out
    word (``held_out``: the val and test words) is left out, or spelling the piece would
    spell a test word in training.
    """
    held = {w.lower() for w in held_out}
    return sorted({v for v in vocab
                   if v.isascii() and v.isalpha() and v.islower() and v not in held})


def letters_conversations(pieces: Sequence[str], n: int, seed: int,
                          held_out: Collection[str] = ()) -> Iterator[Conversation]:
    """``n`` training conversations of the letters curriculum. Half spell one piece of the
    vocabulary (``Which letters make up 'thon'?`` -> ``t-h-o-n``; every piece once per pass,
    each pass in a seeded order); half ask a word task (spell, count or reverse, in the
    tasks' own formats) about a *compound*: two or three pieces joined (``thon`` + ``ex``).

    Why: spelling a word means writing the letters of each of its tokens, and a model sees
    a token's letters nowhere else (the token is one id). Taught piece by piece, the letters
    compose into the spelling of a word never spelled in training (``py`` + ``thon``); without
    it, spell and reverse only recall the training words. The compounds teach the composing
    itself on strings no word list holds, so a held-out word is one more new combination.
    A compound never shares five letters in a row (or a whole shorter word) with a
    ``held_out`` word, forwards or backwards (:func:`compound_words`).
    """
    rng = random.Random(f"{seed}:letters")
    order: list[str] = []
    compounds = compound_words(pieces, held_out, seed)
    for _ in range(n):
        word = next(compounds, None) if rng.random() < COMPOUND_SHARE else None
        if word is not None:
            task = rng.choice(WORD_TASKS)
            q, reply, answer = word_question(task, word, rng)
            yield Conversation((("user", q), ("assistant", reply)), "builtin:letters",
                               "letters", answer, "train", (f"compound:{word}",))
            continue
        if not order:
            order = list(pieces)
            rng.shuffle(order)
        piece = order.pop()
        q = rng.choice(LETTERS_TEMPLATES).format(w=piece)
        yield Conversation((("user", q), ("assistant", spelled(piece))), "builtin:letters",
                           "letters", spelled(piece), "train", (f"piece:{piece}",))


def compound_words(pieces: Sequence[str], held_out: Collection[str], seed: int
                   ) -> Iterator[str]:
    """An endless seeded stream of two or three ``pieces`` joined, 5 to 12 letters, none of
    which shares a run of five letters (or a whole word of four) with a ``held_out`` word or
    that word reversed: spelling or reversing one never writes out part of a test answer.
    The stream ends when 10,000 draws in a row find none (pieces too short, or every
    combination too close to a held-out word), so that a small vocabulary cannot hang it."""
    if not pieces:
        return
    held = {w.lower() for w in held_out}
    held |= {w[::-1] for w in held}
    runs = {w[i:i + 5] for w in held if len(w) >= 5 for i in range(len(w) - 4)}
    short = {w for w in held if len(w) == 4}
    rng = random.Random(f"{seed}:compounds")
    misses = 0
    while misses < 10_000:
        word = "".join(rng.choice(pieces) for _ in range(rng.choice((2, 2, 3))))
        if (not 5 <= len(word) <= 12 or word in held
                or any(word[i:i + 5] in runs for i in range(len(word) - 4))
                or any(word[i:i + 4] in short for i in range(len(word) - 3))):
            misses += 1
            continue
        misses = 0
        yield word


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

