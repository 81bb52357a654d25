"""Word-task replies worked token by token, once the tokenizer exists (a pack-time step).

To spell a word a model writes the letters of each of the word's tokens, in a row. Measured
on the default's SFT model (val spell questions): 87% of the tokens that make up the val
words are spelled right on their own ("Which letters make up 'ous'?"), yet of the words
whose every token it spells right, two in five come out wrong, letters doubled or dropped
where one token ends and the next begins ("helps" -> ``h-e-l-p-p``). The reply keeps no
record of where it stands in the word.

This step writes that record into the reply. Before the letters of a word of two or more
tokens, the reply lists each token and its letters, one line each, then the word's letters
joined (the spell answer, or the first line of the count and reverse working):

    Spell the word 'thousands'.
    th=t-h
    ous=o-u-s
    and=a-n-d
    s=s
    t-h-o-u-s-a-n-d-s

Each line copies the next token of the question (the one after the previous line's) and
spells it right beside it: a lookup, not a count of letters written so far. The lines depend
on the tokenizer, which is trained after the corpus is fetched, so they would be written at
pack time; the answer (the last line) does not change, nor the check.

Measured (``benchmarks/task_recipe.py --working pieces``, ``reports/task_recipe/runs.jsonl``,
tag ``v5-pieces-arith2-reverse05`` against ``v5-arith2-reverse05``): the longer replies cost
a fifth more tokens per conversation at the same steps, spell stayed where it was, reverse
gained a little and count fell by a third. The pipeline does not use it; it stays as the
probe's option, for a larger model or a longer budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from llmcore.data.tasks import spelled
from llmcore.data.tokenizer import LLMTokenizer

__all__ = ["WORD_QUESTIONS", "piece_lines", "pieces_of", "work_pieces"]

# the questions of the word tasks (spell, count, reverse, and the letters curriculum's
# compounds) whose replies start from the word's letters; the word is the last quoted one
WORD_QUESTIONS = re.compile(r"^(Spell the word|How do you spell|How many times does the letter"
                            r"|Reverse the letters of the word) ")
_QUOTED = re.compile(r"'([A-Za-z]+)'")


def piece_lines(pieces: Sequence[str]) -> str:
    """``th=t-h`` per piece, one line each. No space after the ``=``: a letter after a space
    is another token (`` t``) than the one the letters are written with everywhere else."""
    return "\n".join(f"{p}={spelled(p)}" for p in pieces)


def work_pieces(messages: list[dict[str, str]], pieces_of: Callable[[str], list[str]]
                ) -> list[dict[str, str]]:
    """``messages`` with the reply to each word-task question about a word of two or more
    pieces (``pieces_of(word)``: the word's tokens as text) starting with its piece lines.
    Other turns are returned as they are; the list is a new one."""
    out: list[dict[str, str]] = []
    question: str | None = None
    for m in messages:
        if m["role"] == "user":
            question = m["content"]
        elif m["role"] == "assistant" and question and WORD_QUESTIONS.match(question):
            quoted = _QUOTED.findall(question)
            pieces = pieces_of(quoted[-1]) if quoted else []
            if len(pieces) >= 2 and "".join(pieces) == quoted[-1]:
                m = {**m, "content": f"{piece_lines(pieces)}\n{m['content']}"}
            question = None
        out.append(m)
    return out


def pieces_of(tok: LLMTokenizer) -> Callable[[str], list[str]]:
    """word -> its tokens as text, as the word is encoded in quotes (no leading space)."""
    return lambda word: [tok.decode([i]) for i in tok.encode_text(word)]
