"""The letters curriculum mixed into the SFT training conversations (the pack stage's step).

The conversations themselves are :func:`llmcore.data.tasks.letters_conversations`; this
module decides how many there are and where they go, once the tokenizer (whose pieces they
spell) exists.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from llmcore.data.tasks import letter_pieces, letters_conversations

__all__ = ["mix_letters"]


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
