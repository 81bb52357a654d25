"""The synthetic SFT tasks: questions whose one answer can be checked exactly.

Arithmetic (``What is 12 + 7?``), spelling a word letter by letter, counting a letter in a
word and reversing a word. Each task draws from its own seeded stream, so adding a task never
changes another's conversations; the words come from the pydoc topics
(:func:`llmcore.data.pydocs.word_list`), stable for one Python version. The same module
checks an answer (:func:`is_correct`: the reward of GRPO, the judge of on-policy DPO pairs
and of task accuracy) and makes a plausible wrong one (:func:`wrong_answer`, DPO's rejected
reply). The task names are :data:`llmcore.config.tasks.SYNTHETIC_TASKS`, the names params may use.

Held out by construction (:func:`task_pools`): words and operand pairs are split into train /
val / test pools by a stable hash, and each split's questions are drawn from its own pools,
so a test question is about a word or a pair no training conversation mentions.

Replies show their working, in formats a small model can learn: a sum or a difference goes
column by column from the units (``7 + 8 = 15, 4 + 3 + 1 = 8`` then ``85``), counting
spells the word tallying the matches (``b-a(1)-n-a(2)-n-a(3)``), reversing spells it as
spell does (``s-t-a-c-k``, one token per letter), numbers the letters (``1s2t3a4c5k``), reads
them back from the highest number (``5k4c3a2t1s``) and answers letter by letter
(``k-c-a-t-s``). The answer stands alone on the last line. In the plain
``What is 47 + 38?`` -> ``85`` format a model must learn every sum as a fact; column by column
it learns one hundred single-digit facts and a rule, with far fewer examples.

Trade-off: exact match is strict (``19.`` is wrong for ``19``); it is what makes the reward
checkable without a judge model. Only the final line is judged, so a right answer reached by
wrong working still counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from llmcore.config.tasks import SYNTHETIC_TASKS
from llmcore.data.corpus import Conversation
from llmcore.data.pydocs import SYSTEM_PROMPT, docstring_words, word_list
from llmcore.data.splits import SPLITS, split_of

# share of the training sums and differences with an operand of 100..999 (train only)
BIG_SHARE = 0.5

# (val, test) shares of the word pool and of the operand pairs: a test set of 250 distinct
# questions per task needs more than 250 test words (reverse has one template per word)
WORD_SHARES = (0.10, 0.15)
PAIR_SHARES = (0.10, 0.10)

__all__ = ["SYNTHETIC_TASKS", "WORD_TASKS", "TaskPool", "final_answer", "is_correct",
           "question_subject", "spelled", "synthetic_conversations", "task_pools",
           "word_question", "wrong_answer", "wrong_reply"]


def _column_sum(a: int, b: int) -> str:
    """``47 + 38`` worked column by column from the units: ``7 + 8 = 15, 4 + 3 + 1 = 8``."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        steps.append(f"{x} + {y}{' + 1' if carry else ''} = {total}")
        carry = total // 10
    return ", ".join(steps)


def _column_difference(a: int, b: int) -> str:
    """``42 - 18`` (a >= b) from the units, a borrow written out: ``12 - 8 = 4, 4 - 1 - 1 = 2``."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        lend = x - borrow < y
        top = f"1{x}" if lend else str(x)
        steps.append(f"{top}{' - 1' if borrow else ''} - {y} = {x + 10 * lend - borrow - y}")
        borrow = int(lend)
    return ", ".join(steps)


def spelled(word: str) -> str:
    """A word letter by letter: ``s-t-a-c-k`` (one token per letter, whatever the BPE merged)."""
    return "-".join(word)


@dataclass(frozen=True)
class TaskPool:
    """What one split's questions may be about: words (spell, count, reverse), unordered
    operand pairs (sums and differences) and whether products are asked (train only)."""

    words: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    products: bool
    # word -> its stem group (:func:`word_stems`), for the words that have one
    stems: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


def task_pools(words: Sequence[str] | None = None, extra: Sequence[str] | None = None
               ) -> dict[str, TaskPool]:
    """Each split's pool, by a stable hash of the word or the pair (:func:`split_of`).

    Words: one pool for spell, count and reverse (every reply spells the word, so a word
    tested in one task must not be trained in another). Pairs ``{a, b}`` of 0..99 unordered:
    ``12 + 7``, ``7 + 12`` and ``12 - 7`` fall together. Products of two numbers up to 12 are
    169 table facts with no working to generalise from: all of them stay in training, and
    the held-out splits ask sums and differences only.

    ``extra`` words (default, for the builtin word list: the docstrings' words,
    :func:`llmcore.data.pydocs.docstring_words`) join the train pool only: with ~1,800 train
    words a model can learn each word's spelling by heart, with several thousand more it has
    to compose the letters of its tokens, which is what a held-out word asks. An extra word
    that is a held-out word, or begins or ends another (``assignments`` for a held-out
    ``assignment``), is left out.
    """
    if extra is None:
        extra = docstring_words() if words is None else ()
    words = word_list() if words is None else words
    by_split: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    stems = word_stems(words)
    for w in words:
        by_split[split_of(stem_key(stems[w]), *WORD_SHARES)][0].append(w)
    held = {w for s in ("val", "test") for w in by_split[s][0]}
    held_ends = {e for h in held for e in _ends(h)}
    by_split["train"][0].extend(sorted(
        x for x in set(extra) - set(words)
        if x not in held_ends and not any(e in held for e in _ends(x))))
    for a in range(100):
        for b in range(a, 100):
            by_split[split_of(pair_key(a, b), *PAIR_SHARES)][1].append((a, b))
    return {s: TaskPool(tuple(ws), tuple(ps), products=s == "train", stems=stems)
            for s, (ws, ps) in by_split.items()}


def word_stems(words: Iterable[str], least: int = 5) -> dict[str, str]:
    """Each word's stem group, named by its shortest word (then the first alphabetically):
    words of which one begins or ends the other with ``least`` letters or more in common
    (``assign``, ``assigned``, ``assignment``; ``table``, ``printable``) fall together, so
    that a test word's inflections are never spelled in training."""
    pool = sorted(set(words))
    parent = {w: w for w in pool}

    def root(w: str) -> str:
        while parent[w] != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for w in pool:
        for e in _ends(w, least):
            if e != w and e in parent:
                a, b = sorted((root(e), root(w)), key=lambda x: (len(x), x))
                parent[b] = a
    return {w: root(w) for w in pool}


def stem_key(stem: str) -> str:
    return f"stem:{stem}"


def _ends(word: str, least: int = 4) -> set[str]:
    """The word's beginnings and endings of ``least`` letters or more, itself included: two
    words are related when one is among the other's (``assignment``, ``assignments``)."""
    return {word[:i] for i in range(least, len(word) + 1)} | \
        {word[-i:] for i in range(least, len(word) + 1)}


def word_key(word: str) -> str:
    return f"word:{word}"


def pair_key(a: int, b: int) -> str:
    return f"pair:{min(a, b)},{max(a, b)}"


def _synthetic_one(task: str, rng: random.Random, pool: TaskPool) -> tuple[str, str, str, str]:
    """(question, reply, final answer, pool key). A reply may work the answer out first,
    one line per step, and ends with the answer on a line of its own (:func:`final_answer`
    reads it). The pool key names what the question is about (a word, an operand pair)."""
    if task == "arithmetic":
        op = rng.choice("+-*" if pool.products else "+-")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            key = f"product:{min(a, b)},{max(a, b)}"
        else:
            if pool.products and rng.random() < BIG_SHARE:
                # train only: operands up to 999, one of them 100 or more. No held-out pair
                # has one, and at ~800,000 pairs no sum can be learned by heart: only the
                # columns can, which is what a held-out pair of 0..99 asks for
                a, b = sorted((rng.randint(0, 999), rng.randint(100, 999)))
            else:
                a, b = rng.choice(pool.pairs)  # a <= b
            a, b = (b, a) if op == "-" or rng.random() < 0.5 else (a, b)  # a >= b for "-"
            key = pair_key(a, b)
        value = str({"+": a + b, "-": a - b, "*": a * b}[op])
        q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
        # a product of two numbers up to 12 is a table fact; sums and differences go by column
        work = {"+": _column_sum, "-": _column_difference}.get(op)
        return (q.format(a=a, op=op, b=b), (f"{work(a, b)}\n{value}" if work else value),
                value, key)
    word = rng.choice(pool.words)
    key = word_key(word)
    if task == "spell":
        q = rng.choice(("Spell the word '{w}'.", "How do you spell '{w}' letter by letter?"))
        return q.format(w=word), spelled(word), spelled(word), key
    if task == "count":
        letter = rng.choice(sorted(set(word)) if rng.random() < 0.8 else "abcdefghijklmnopqrstuvwxyz")
        q = "How many times does the letter '{c}' appear in '{w}'?"
        # the word spelled, each match tallied where it stands: b-a(1)-n-a(2)-n-a(3). (A
        # plain spelled line first, as reverse has, measured worse on val: 0.31 against 0.52,
        # reports/task_recipe)
        tally, n = [], 0
        for ch in word:
            n += ch == letter
            tally.append(f"{ch}({n})" if ch == letter else ch)
        return q.format(c=letter, w=word), f"{'-'.join(tally)}\n{n}", str(n), key
    if task == "reverse":
        # the word spelled as spell does (the skill the three word tasks share: the letters
        # of each of the word's tokens, in a row), then each letter numbered where it
        # stands, read back from the highest number, and the
        # answer letter by letter: 1s2t3a4c5k / 5k4c3a2t1s / k-c-a-t-s. Writing the next letter
        # is then a lookup ("the letter after 4") rather than counting back from the end, and
        # the answer is one token per letter: the reversed word as one string would be BPE
        # pieces of a non-word, spelling in reverse. Digits and letters are tokens of their
        # own, so the lines need no separator (a 10-letter word's reply is 83 tokens)
        back = word[::-1]
        numbered = [f"{i}{ch}" for i, ch in enumerate(word, 1)]
        answer = spelled(back)
        return (f"Reverse the letters of the word '{word}'.",
                f"{spelled(word)}\n{''.join(numbered)}\n{''.join(reversed(numbered))}\n{answer}",
                answer, key)
    raise ValueError(f"unknown synthetic task {task!r}")


def _synthetic_conversation(task: str, rng: random.Random, pool: TaskPool, split: str
                            ) -> Conversation:
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.2:
        turns.append(("system", SYSTEM_PROMPT))
    n_turns = 2 if rng.random() < 0.2 else 1
    answer, keys = "", []
    for _ in range(n_turns):
        q, reply, answer, key = _synthetic_one(task, rng, pool)
        turns += [("user", q), ("assistant", reply)]
        keys.append(key)
        if key.startswith("word:") and key[5:] in pool.stems:  # the split is the stem's
            keys.append(stem_key(pool.stems[key[5:]]))
    return Conversation(tuple(turns), f"builtin:synthetic/{task}", task, answer, split,
                        tuple(dict.fromkeys(keys)))


def synthetic_conversations(per_task: int | Mapping[str, int], seed: int, val_per_task: int = 0,
                            test_per_task: int = 0) -> Iterator[Conversation]:
    """Tasks with one exactly checkable answer. A fifth have a system prompt, a fifth two turns.

    ``per_task`` training conversations per task (one number, or task -> number) from the
    train pools, and ``val_per_task`` /
    ``test_per_task`` held-out ones from the val / test pools (:func:`task_pools`), each split
    from a seeded stream of its own: no held-out question can be a training one, or be about
    a word or a pair that training shows. Held-out conversations end in distinct questions
    (the one scored), so that n examples are n different items; a small pool can give fewer.
    A task's training stream is its own: the first n of a longer draw are the n of a shorter
    one, so giving one task more leaves the others' conversations as they were.
    """
    pools = task_pools()
    train = per_task if isinstance(per_task, Mapping) else dict.fromkeys(SYNTHETIC_TASKS,
                                                                          per_task)
    wanted = {"val": val_per_task, "test": test_per_task}
    for task in SYNTHETIC_TASKS:
        for split in SPLITS:
            rng = random.Random(f"{seed}:{task}" if split == "train" else f"{seed}:{task}:{split}")
            if split == "train":
                for _ in range(train.get(task, 0)):
                    yield _synthetic_conversation(task, rng, pools[split], split)
                continue
            asked: set[str] = set()
            for _ in range(50 * wanted[split]):  # bounded: a small pool can run out
                if len(asked) == wanted[split]:
                    break
                c = _synthetic_conversation(task, rng, pools[split], split)
                question = [m for r, m in c.messages if r == "user"][-1]
                if question not in asked:
                    asked.add(question)
                    yield c


WORD_TASKS = ("spell", "count", "reverse")


def word_question(task: str, word: str, rng: random.Random) -> tuple[str, str, str]:
    """(question, worked reply, final answer) of a word task about ``word``, in the format
    of the task's corpus conversations."""
    q, reply, answer, _ = _synthetic_one(task, rng, TaskPool((word,), (), False))
    return q, reply, answer


def question_subject(question: str, words: Collection[str] | None = None
                     ) -> tuple[str, str] | None:
    """What a task question is about and the split that subject falls in:
    ``("pair:7,12", "val")`` for ``What is 12 + 7?``, ``("word:python", "train")`` for
    ``Spell the word 'python'.``; ``(key, "none")`` for a word outside the word list (no
    task asks about it); None for a question about neither. For the showcase, so that a
    reader sees whether an answer is recalled (train) or worked out (val, test)."""
    m = re.search(r"(\d+)\s*([-+*])\s*(\d+)", question)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        if op == "*":
            return f"product:{min(a, b)},{max(a, b)}", "train"
        return pair_key(a, b), split_of(pair_key(a, b), *PAIR_SHARES)
    quoted = re.findall(r"'([A-Za-z]+)'", question)
    if not quoted:
        return None
    word = quoted[-1]
    known = word_list() if words is None else words
    stems = word_stems(known)
    return word_key(word), (split_of(stem_key(stems[word]), *WORD_SHARES) if word in stems
                            else "none")


def final_answer(reply: str) -> str:
    """The answer a reply ends with: its last non-blank line, outer spaces stripped."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def is_correct(reply: str, answer: str) -> bool:
    """The synthetic tasks' check: the reply's final line is exactly the answer (outer spaces
    ignored). The working lines before it are not judged: a reply that works it out wrongly
    but ends right counts, and one that works it out right but ends wrong does not."""
    return final_answer(reply) == answer.strip()


def wrong_reply(task: str, reply: str, answer: str, rng: random.Random) -> str:
    """``reply`` with its final answer replaced by a plausible wrong one (working kept)."""
    lines = reply.strip().splitlines()
    return "\n".join([*lines[:-1], wrong_answer(task, answer, rng)])


def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same shape (never equal to ``answer``)."""
    for _ in range(20):
        if task in ("arithmetic", "count") and answer.lstrip("-").isdigit():
            value = int(answer) + rng.choice([-1, 1]) * rng.randint(1, 3 if task == "count" else 10)
            candidate = str(max(value, 0)) if task == "count" else str(value)
        elif len(answer.split("-") if "-" in answer else answer) >= 2:
            # a spelled answer (s-t-a-c-k) is changed letter-wise and stays spelled
            sep = "-" if "-" in answer else ""
            chars = answer.split("-") if sep else list(answer)
            i = rng.randrange(len(chars) - 1)
            if rng.random() < 0.5:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]  # swap two neighbours
            else:
                del chars[i]  # drop one
            candidate = sep.join(chars)
        else:
            candidate = answer + answer
        if candidate.strip() != answer.strip():
            return candidate
    return answer + "?"
