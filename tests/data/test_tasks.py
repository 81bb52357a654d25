"""The synthetic tasks' worked formats: every working line is right arithmetic, the answer can
be rebuilt from it, and only the final line is judged."""

from __future__ import annotations

import random
import re

from llmcore.data.pydocs import word_list
from llmcore.data.tasks import (
    TaskPool,
    _column_difference,
    _column_sum,
    _synthetic_one,
    final_answer,
    is_correct,
    pair_key,
    spelled,
    synthetic_conversations,
    task_pools,
    word_key,
    wrong_answer,
    wrong_reply,
)

ALL_PAIRS = tuple((a, b) for a in range(100) for b in range(a, 100))


def _steps(work: str) -> list[tuple[str, int]]:
    return [(left, int(right)) for left, right in (s.split(" = ") for s in work.split(", "))]


def test_every_column_sum_is_right_and_rebuilds_the_sum():
    for a in range(100):
        for b in range(100):
            steps = _steps(_column_sum(a, b))
            assert all(eval(left) == total for left, total in steps)  # noqa: S307 (digits only)
            # the answer is the last column's total, then the units of the others, in order
            rebuilt = str(steps[-1][1]) + "".join(str(t % 10) for _, t in reversed(steps[:-1]))
            assert int(rebuilt) == a + b, (a, b)
            carries = [t // 10 for _, t in steps]
            assert all((steps[i][0].count("+") == 2) == bool(carries[i - 1])
                       for i in range(1, len(steps)))


def test_every_column_difference_is_right_and_rebuilds_the_difference():
    for a in range(100):
        for b in range(a + 1):
            steps = _steps(_column_difference(a, b))
            assert all(eval(left) == d and 0 <= d <= 9 for left, d in steps), (a, b)
            assert sum(d * 10 ** i for i, (_, d) in enumerate(steps)) == a - b


def test_replies_end_with_the_answer_and_show_their_working():
    rng, pool = random.Random(3), task_pools()["train"]  # the one with products
    seen, big = set(), 0
    for _ in range(400):
        task = rng.choice(["arithmetic", "spell", "count", "reverse"])
        question, reply, answer, key = _synthetic_one(task, rng, pool)
        assert final_answer(reply) == answer and is_correct(reply, answer)
        lines = reply.split("\n")
        word = re.findall(r"'([a-z]+)'", question)[-1] if task != "arithmetic" else None
        if word is not None:
            assert key == word_key(word) and word in pool.words
        if task == "spell":
            assert lines == [spelled(word)] and answer.replace("-", "") == word
        elif task == "reverse":
            numbered = [f"{i}{ch}" for i, ch in enumerate(word, 1)]
            assert lines == [spelled(word), "".join(numbered), "".join(numbered[::-1]),
                             spelled(word[::-1])]
        elif task == "count":
            letter = re.findall(r"letter '([a-z])'", question)[0]
            tally = lines[0].split("-")
            assert "".join(re.sub(r"\(\d+\)", "", t) for t in tally) == word
            marks = [int(m) for m in re.findall(r"\((\d+)\)", lines[0])]
            assert marks == list(range(1, word.count(letter) + 1))
            assert answer == str(word.count(letter))
        else:
            a, op, b = re.findall(r"(\d+) ([-+*]) (\d+)", question)[0]
            assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b),
                                   "*": int(a) * int(b)}[op]
            assert len(lines) == (1 if op == "*" else 2)
            a, b = sorted((int(a), int(b)))
            if op == "*":  # a table fact, keyed apart from the pairs of sums and differences
                assert key == f"product:{a},{b}" and b <= 12
            elif b >= 100:  # train only: 3-digit operands, which no held-out pair has
                assert key == pair_key(a, b) and pool.products and b <= 999
                big += 1
            else:
                assert key == pair_key(a, b) and (a, b) in pool.pairs
        seen.add(task)
    assert big > 0
    assert seen == {"arithmetic", "spell", "count", "reverse"}


def test_only_the_final_line_is_judged():
    assert is_correct("7 + 8 = 15, 4 + 3 + 1 = 8\n85", "85")
    assert is_correct("wrong working\n85\n\n", " 85")  # blank lines and outer spaces ignored
    assert not is_correct("7 + 8 = 15, 4 + 3 + 1 = 8\n85\n86", "85")
    assert not is_correct("85 is it", "85") and not is_correct("", "85")
    assert final_answer("  \n ") == ""
    rng = random.Random(0)
    reply = "1s2t3a4c5k\n5k4c3a2t1s\nk-c-a-t-s"
    for _ in range(30):
        wrong = wrong_reply("reverse", reply, "k-c-a-t-s", rng)
        assert wrong.split("\n")[:2] == reply.split("\n")[:2] and not is_correct(wrong, "k-c-a-t-s")


def test_the_answer_field_is_the_final_line_of_the_last_reply():
    convs = list(synthetic_conversations(20, seed=5, val_per_task=5, test_per_task=5))
    assert {c.split for c in convs} == {"train", "val", "test"}
    for conv in convs:
        last = conv.messages[-1]
        assert last[0] == "assistant" and final_answer(last[1]) == conv.answer
        assert conv.pool and all(k.startswith(("word:", "stem:", "pair:", "product:"))
                                 for k in conv.pool)


def test_a_wrong_spelled_answer_stays_spelled():
    rng = random.Random(1)
    for _ in range(50):
        wrong = wrong_answer("reverse", "k-c-a-t-s", rng)
        assert wrong != "k-c-a-t-s" and all(len(p) == 1 for p in wrong.split("-"))


def test_the_longest_worked_reply_fits_the_generation_budget(tiny_tokenizer):
    from llmcore.config.dpo import DPOConfig
    from llmcore.config.evaluate import EvaluateConfig
    from llmcore.config.rl import RLConfig

    rng, words = random.Random(0), word_list()
    longest = max(words, key=len)
    pool = TaskPool((longest,), ALL_PAIRS, products=True)
    worst = 0
    for task in ("arithmetic", "spell", "count", "reverse"):
        for _ in range(300):
            _, reply, _, _ = _synthetic_one(task, rng, pool)
            worst = max(worst, len(tiny_tokenizer.encode(reply)) + 1)  # + <|im_end|>
    # digits and single letters are tokens of their own whatever the vocabulary merged
    assert worst <= min(EvaluateConfig().max_new_tokens, DPOConfig().max_new_tokens,
                        RLConfig().max_new_tokens)


def test_letter_pieces_are_the_quoted_word_pieces_minus_held_out_words():
    from llmcore.data.curriculum import letter_pieces, letters_conversations

    vocab = ["<|pad|>", "thon", "py", "Ġthe", " the", "Py", "ab1", "é", "stack", "a", "cache"]
    pieces = letter_pieces(vocab, held_out={"cache"})
    assert pieces == ["a", "py", "stack", "thon"]  # lowercase ASCII letters, sorted, no 'cache'
    convs = list(letters_conversations(pieces, 40, seed=1))
    assert len(convs) == 40 and {c.split for c in convs} == {"train"}
    assert {c.task for c in convs} == {"letters"}
    spelt = [c for c in convs if c.pool[0].startswith("piece:")]
    compounds = [c for c in convs if c.pool[0].startswith("compound:")]
    assert len(spelt) + len(compounds) == 40 and 10 <= len(compounds) <= 30
    # every piece once per pass: the first four cover the pieces, the next four again
    first = [re.findall(r"'([a-z]+)'", c.messages[0][1])[0] for c in spelt]
    assert sorted(first[:4]) == pieces and sorted(first[4:8]) == pieces
    for c, piece in zip(spelt, first, strict=True):
        assert c.messages[-1] == ("assistant", spelled(piece)) and c.answer == spelled(piece)
        assert c.pool == (f"piece:{piece}",)
    # a compound is asked in a word task's own format, and judged by its answer
    for c in compounds:
        word = c.pool[0].split(":", 1)[1]
        assert re.fullmatch("(py|thon|stack|a){2,3}", word) and f"'{word}'" in c.messages[0][1]
        assert is_correct(c.messages[-1][1], c.answer)
    assert {c.messages[0][1].split()[0] for c in compounds} >= {"Reverse", "How"}
    assert [c.messages for c in letters_conversations(pieces, 40, seed=1)] == \
        [c.messages for c in convs]  # seeded


def test_compounds_never_write_out_a_run_of_a_held_out_word():
    from llmcore.data.curriculum import compound_words

    pieces = ["con", "crete", "ab", "sent", "xy", "zq", "conc"]
    stream = compound_words(pieces, {"concrete", "absent"}, seed=3)
    words = [next(stream) for _ in range(300)]
    assert len(set(words)) > 20
    for w in words:
        assert 5 <= len(w) <= 12
        for held in ("concrete", "absent"):
            for run in {held[i:i + 5] for i in range(len(held) - 4)}:
                assert run not in w and run[::-1] not in w
    assert "concrete" not in words and any("con" in w for w in words)
    free = compound_words(pieces, (), seed=3)
    assert any("concr" in next(free) for _ in range(300))  # the filter is what keeps it out


def test_letters_from_pieces_too_short_for_a_compound_end_without_hanging():
    from llmcore.data.curriculum import compound_words, letters_conversations

    assert list(compound_words(["a", "b"], (), seed=0)) == []  # two letters at most: none
    convs = list(letters_conversations(["a", "b"], 20, seed=0))
    assert len(convs) == 20 and all(c.pool[0].startswith("piece:") for c in convs)


def test_a_word_and_its_inflections_share_one_stem_and_split():
    from llmcore.data.tasks import word_stems

    stems = word_stems(["assign", "assigned", "assignment", "table", "printable", "print",
                        "cat", "cats", "concrete"])
    assert stems["assigned"] == stems["assignment"] == "assign"
    # 'table' ends 'printable', 'print' begins it: one group, named by its shortest word
    assert stems["printable"] == stems["print"] == stems["table"] == "print"
    assert stems["cats"] == "cats" and stems["cat"] == "cat"  # 3 letters: too short to join
    assert stems["concrete"] == "concrete"
    pools = task_pools()
    for word in ("variable", "variables"):  # once split apart, now together
        assert sum(word in p.words for p in pools.values()) == 1
    assert [s for s, p in pools.items() if "variable" in p.words] == \
        [s for s, p in pools.items() if "variables" in p.words]


def test_question_subject_names_the_split_a_showcase_question_is_about():
    from llmcore.data.tasks import question_subject

    pools = task_pools()
    key, split = question_subject("What is 12 + 7?")
    assert key == pair_key(7, 12) and (7, 12) in pools[split].pairs
    key, split = question_subject("Spell the word 'python'.")
    assert key == word_key("python") and "python" in pools[split].words
    assert question_subject("How many times does the letter 'a' appear in 'zzqqx'?") == \
        (word_key("zzqqx"), "none")
    assert question_subject("Compute 3 * 4.") == ("product:3,4", "train")
    assert question_subject("What does `os.path` do?") is None


def test_compound_task_rows_ask_each_word_task_about_fresh_compounds():
    """GRPO's ``rl.words: compounds``: as many questions per word task as asked, each about
    a compound of the vocabulary's pieces (never near a held-out word), judged by its answer,
    seeded, and another seed gives other strings."""
    from llmcore.data.curriculum import compound_task_rows, held_out_words

    convs = {"train": [{"pool": ["word:python"]}],
             "val": [{"pool": ["word:concrete", "x"]}], "test": [{"pool": ["word:absent"]}]}
    held = held_out_words(convs)  # type: ignore[arg-type]
    assert held == {"concrete", "absent"}
    vocab = ["con", "crete", "ab", "sent", "xy", "zq", "conc", "py", "thon", "<|im_end|>"]
    rows = compound_task_rows({"spell": 30, "count": 20, "reverse": 10, "arithmetic": 5},
                              vocab, held, seed=7)
    assert [r["task"] for r in rows] == ["spell"] * 30 + ["count"] * 20 + ["reverse"] * 10
    for r in rows:
        word = r["pool"][0].removeprefix("compound:")
        assert re.fullmatch("(con|crete|ab|sent|xy|zq|conc|py|thon){2,3}", word)
        assert f"'{word}'" in r["messages"][0]["content"]
        assert is_correct(r["messages"][1]["content"], r["answer"])
        for h in held:
            assert all(h[i:i + 5] not in word for i in range(len(h) - 4))
    assert len({r["pool"][0] for r in rows}) > 30
    again = compound_task_rows({"spell": 30, "count": 20, "reverse": 10}, vocab, held, seed=7)
    assert again == rows
    other = compound_task_rows({"spell": 30}, vocab, held, seed=8)
    assert [r["pool"] for r in other] != [r["pool"] for r in rows[:30]]
    # pieces too short for any compound: no rows, no hang
    assert compound_task_rows({"spell": 5}, ["a", "b"], (), seed=0) == []
