"""Word n-grams as 64-bit hashes: what near-copy grouping (fetch) and decontamination
(evaluate) both measure text with.

* Words, not tokens: runs of letters, digits and underscores, lowercased (punctuation, spacing
  and case do not hide a copy). Special tokens become line breaks.
* n-grams are 64-bit polynomial hashes over word numbers, computed with NumPy's wrapping
  uint64 arithmetic (two different n-grams collide with probability ~2^-64 per pair).

Trade-off: exact n-grams miss paraphrases; 13 words (the rule of the GPT-3 paper) is a
sentence, long enough that a shared run is a copy rather than a common phrase.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

NGRAM = 13
_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so multiplication mod 2^64 mixes every bit
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")  # the chat template's and the stream's special tokens
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
    """Text -> word numbers, one numbering shared by everything compared with it."""

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


def example_grams(words: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """The n-grams an example is judged by: every run of ``n`` words, or the whole example as
    one run when it is shorter than ``n`` words."""
    return gram_hashes(words, n) if len(words) >= n else gram_hashes(words, len(words))
