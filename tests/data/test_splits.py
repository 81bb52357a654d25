"""Three splits by construction (:mod:`llmcore.data.splits`): train / val / test decided by pool
keys, so that nothing a held-out example is about is ever trained on.

Each test here would fail if the contract broke: a key that moves when others are added, a
word or operand pair in two splits' questions, near-copies left in two splits, a document
group split across tables, the code of a held-out module trained on, a breach not caught.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from llmcore.config.fetch import FetchConfig
from llmcore.config.tasks import SYNTHETIC_TASKS
from llmcore.data.assemble import collect
from llmcore.data.corpus import (
    Conversation,
    CorpusError,
    Document,
    read_conversations,
    read_documents,
)
from llmcore.data.fetch import build_corpus
from llmcore.data.pydocs import docstring_words, word_list
from llmcore.data.sources import content_hash
from llmcore.data.splits import (
    COMMON_RUN_GROUPS,
    CONTRACTS,
    SPLITS,
    merge_near_copies,
    pool_breach,
    split_of,
    unit_interval,
)
from llmcore.data.tasks import (
    pair_key,
    stem_key,
    synthetic_conversations,
    task_pools,
    word_key,
    word_stems,
)

HELD_OUT = ("val", "test")
ALL_PAIRS = {(a, b) for a in range(100) for b in range(a, 100)}


def words_text(rng: random.Random, n: int) -> str:
    """``n`` made-up lowercase words: text no other call shares a 13-word run with."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                            for _ in range(rng.randint(3, 9))) for _ in range(n))


def splits_of_keys(tables: dict[str, list[dict]]) -> dict[str, set[str]]:
    """Pool key -> the splits of the tables its rows are in."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, rows in tables.items():
        for row in rows:
            for key in row["pool"]:
                where[key].add(name.rsplit("_", 1)[1])
    return where


def held_out_key(prefix: str, split: str, val: float, test: float) -> str:
    """The first ``prefix<i>`` that hashes to ``split``."""
    return next(k for k in (f"{prefix}{i}" for i in range(10_000))
                if split_of(k, val, test) == split)


# --- split_of -----------------------------------------------------------------------------


def test_split_of_is_a_function_of_the_key_alone():
    keys = [f"doc:{i}" for i in range(3000)]
    before = {k: split_of(k, 0.1, 0.1) for k in keys}
    more = keys + [f"other:{i}" for i in range(3000)]
    random.Random(0).shuffle(more)  # other keys, another order: nothing moves
    after = {k: split_of(k, 0.1, 0.1) for k in more}
    assert all(after[k] == v for k, v in before.items())
    # the test split does not depend on val_fraction: widening val only takes from train
    for k in keys:
        wide = split_of(k, 0.3, 0.1)
        assert (wide == "test") == (before[k] == "test")
        assert before[k] != "val" or wide == "val"
    # the cut points: test below test_fraction, val next, train the rest
    for k in keys[:300]:
        u = unit_interval(k)
        assert 0.0 <= u < 1.0
        assert before[k] == ("test" if u < 0.1 else "val" if u < 0.2 else "train")


def test_split_of_gives_three_splits_of_about_the_requested_shares():
    n = 20_000
    counts = Counter(split_of(f"key number {i}", 0.15, 0.05) for i in range(n))
    assert set(counts) == set(SPLITS)
    for split, share in (("val", 0.15), ("test", 0.05), ("train", 0.8)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[split] - n * share) < 5 * sd, (split, counts)
    assert "test" not in {split_of(f"key number {i}", 0.1, 0.0) for i in range(2000)}


def test_every_evaluation_set_has_a_contract():
    assert set(SYNTHETIC_TASKS) | {"doc_questions", "docs_test"} <= set(CONTRACTS)
    assert all(isinstance(v, str) and v for v in CONTRACTS.values())


# --- the synthetic tasks' pools -------------------------------------------------------------


@pytest.fixture(scope="module")
def pools():
    return task_pools()


def test_word_pools_are_disjoint_and_cover_the_word_list(pools):
    assert set(pools) == set(SPLITS)
    words = {s: set(p.words) for s, p in pools.items()}
    assert not words["train"] & words["val"] and not words["train"] & words["test"]
    assert not words["val"] & words["test"]
    # the word list is split whole; training also spells the docstrings' other words
    assert set(word_list()) <= words["train"] | words["val"] | words["test"]
    extra = words["train"] - set(word_list())
    assert extra and extra <= set(docstring_words())
    assert len(set(pools["train"].words)) == len(pools["train"].words)  # no repeats
    # a word and its inflections fall in one split; no extra word inflects a held-out one
    stems = word_stems(word_list())
    for w in words["val"] | words["test"]:
        held = "val" if w in words["val"] else "test"
        assert all(x in words[held] for x in stems if stems[x] == stems[w]), w
    held_out = words["val"] | words["test"]
    assert not any(x.startswith(h) or x.endswith(h) for x in extra for h in held_out
                   if len(h) >= 4)
    assert "assignments" not in words["train"] or "assignment" not in held_out
    # each held-out pool is big enough to be a test set, and smaller than training's
    assert len(words["test"]) >= FetchConfig().synthetic_test_per_task
    assert 100 < len(words["val"]) < len(words["train"])


def test_pair_pools_are_disjoint_unordered_and_products_train_only(pools):
    pairs = {s: set(p.pairs) for s, p in pools.items()}
    assert all(a <= b for ps in pairs.values() for a, b in ps)  # stored once, smaller first
    assert not pairs["train"] & pairs["val"] and not pairs["train"] & pairs["test"]
    assert not pairs["val"] & pairs["test"]
    assert pairs["train"] | pairs["val"] | pairs["test"] == ALL_PAIRS
    assert sum(len(p.pairs) for p in pools.values()) == len(ALL_PAIRS)
    assert all(len(ps) > 300 for ps in pairs.values())
    # 12 + 7, 7 + 12 and 12 - 7 are one pair: one key, whatever the order
    assert pair_key(12, 7) == pair_key(7, 12)
    assert {pair_key(a, b) for a, b in ALL_PAIRS} == {pair_key(b, a) for a, b in ALL_PAIRS}
    assert [pools[s].products for s in SPLITS] == [True, False, False]


def question_subjects(conv: Conversation) -> set[tuple]:
    """What the questions of a synthetic conversation are about, read from the questions
    themselves (not from the pool column): ("word", w), ("pair", a, b) or ("product", a, b)."""
    out: set[tuple] = set()
    for role, text in conv.messages:
        if role != "user":
            continue
        if conv.task == "arithmetic":
            ((a, op, b),) = re.findall(r"(\d+) ([-+*]) (\d+)", text)
            a, b = sorted((int(a), int(b)))
            out.add(("product" if op == "*" else "pair", a, b))
        else:  # the word is the last quoted run (count quotes its letter first)
            out.add(("word", re.findall(r"'([a-z]+)'", text)[-1]))
    assert out, conv
    return out


def subject_key(subject: tuple) -> str:
    if subject[0] == "word":
        return word_key(subject[1])
    if subject[0] == "pair":
        return pair_key(subject[1], subject[2])
    return f"product:{subject[1]},{subject[2]}"


@pytest.fixture(scope="module")
def synthetic():
    return list(synthetic_conversations(1000, seed=0, val_per_task=50, test_per_task=50))


def test_held_out_questions_share_no_word_or_pair_with_training(synthetic, pools):
    by_split = {s: [c for c in synthetic if c.split == s] for s in SPLITS}
    assert Counter(c.task for c in by_split["test"]) == dict.fromkeys(SYNTHETIC_TASKS, 50)
    assert Counter(c.task for c in by_split["val"]) == dict.fromkeys(SYNTHETIC_TASKS, 50)
    subjects = {s: set().union(*map(question_subjects, cs)) for s, cs in by_split.items()}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not subjects[a] & subjects[b], (a, b, sorted(subjects[a] & subjects[b])[:5])
    # the pool column says what the questions say, and names keys of its own split's pool
    pool_keys = {s: {word_key(w) for w in p.words} | {pair_key(a, b) for a, b in p.pairs}
                 | {stem_key(p.stems[w]) for w in p.words if w in p.stems}
                 for s, p in pools.items()}
    stems = pools["train"].stems
    for c in synthetic:
        subjects_ = question_subjects(c)
        assert set(c.pool) == {subject_key(x) for x in subjects_} | {
            stem_key(stems[x[1]]) for x in subjects_ if x[0] == "word" and x[1] in stems}, c
        assert all(k in pool_keys[c.split] or (c.split == "train" and (
            k.startswith("product:") or (k.startswith("pair:") and max(
                map(int, k[5:].split(","))) >= 100))) for k in c.pool), c
    # every task's training reaches the held-out pools' neighbours: the tests above are not
    # vacuous (training shows thousands of words and pairs, products included)
    kinds = Counter(x[0] for x in subjects["train"])
    assert kinds["word"] > 1000 and kinds["pair"] > 500 and kinds["product"] > 50


def test_test_questions_are_distinct_and_ask_no_products(synthetic):
    test = [c for c in synthetic if c.split == "test"]
    for task in SYNTHETIC_TASKS:
        scored = [[m for r, m in c.messages if r == "user"][-1] for c in test if c.task == task]
        assert len(scored) == 50 and len(set(scored)) == 50, task
    arithmetic = [c for c in synthetic if c.task == "arithmetic"]
    held_out_questions = [m for c in arithmetic if c.split != "train"
                          for r, m in c.messages if r == "user"]
    assert held_out_questions and not any("*" in q for q in held_out_questions)
    assert any("*" in m for c in arithmetic if c.split == "train" for _, m in c.messages)


def test_held_out_sets_do_not_depend_on_the_training_count(synthetic):
    small = list(synthetic_conversations(10, seed=0, val_per_task=50, test_per_task=50))
    for split in HELD_OUT:
        assert [c for c in small if c.split == split] == [
            c for c in synthetic if c.split == split], split


# --- near-copies --------------------------------------------------------------------------


def test_near_copies_join_their_groups():
    rng = random.Random(1)
    base = words_text(rng, 200).split()
    copy = list(base)
    for i in (30, 90, 150):  # a few words changed
        copy[i] = "changed"
    other = words_text(rng, 200)
    groups = ["module:posixpath", "module:ntpath", "module:json", "module:ntpath"]
    texts = [" ".join(base), " ".join(copy), other, words_text(rng, 50)]
    merged = merge_near_copies(groups, texts)
    assert merged == {"module:ntpath": "module:ntpath", "module:posixpath": "module:ntpath",
                      "module:json": "module:json"}  # the smaller name stands for the group
    # the order of the documents does not change the result
    assert merge_near_copies(groups[::-1], texts[::-1]) == merged
    # transitive: a copy of the copy in a third group joins both
    third = list(copy)
    third[60] = "again"
    merged = merge_near_copies(groups + ["module:zz"], texts + [" ".join(third)])
    assert merged["module:zz"] == merged["module:posixpath"] == "module:ntpath"
    # punctuation and case do not hide a copy
    shouted = " ".join(w.upper() + "," for w in base)
    assert merge_near_copies(["a", "b"], [" ".join(base), shouted]) == {"a": "a", "b": "a"}


def test_unrelated_groups_and_common_boilerplate_do_not_join():
    rng = random.Random(2)
    boiler = ("this module is part of the standard library and is distributed under the terms "
              "of the python software foundation licence agreement")
    assert len(boiler.split()) == 21
    n = COMMON_RUN_GROUPS + 2  # the sentence is in more groups than a copy can be
    groups = [f"module:m{i}" for i in range(n)]
    texts = [f"{boiler} {words_text(rng, 30)}" for _ in range(n)]  # a fifth of each document
    assert merge_near_copies(groups, texts) == {g: g for g in groups}
    # the same sentence shared by two groups only is a copy: they join
    pair = merge_near_copies(groups[:2], texts[:2])
    assert pair == {groups[0]: groups[0], groups[1]: groups[0]}
    # unrelated documents stay apart, and a group without documents long enough is itself
    loose = merge_near_copies(["a", "b", "c"], [words_text(rng, 300), words_text(rng, 300),
                                                "too short"])
    assert loose == {"a": "a", "b": "b", "c": "c"}


# --- collect: groups, doc questions, training-only code, breaches ---------------------------


def builtin_like(n_groups: int = 40, seed: int = 0) -> list[Document | Conversation]:
    """A builtin corpus in small: per module group two documents, a question answered from
    the first of them and a training-only code document."""
    rng = random.Random(seed)
    recs: list[Document | Conversation] = []
    for i in range(n_groups):
        name, group = f"mod{i:02d}", f"module:mod{i:02d}"
        docs = [words_text(rng, 80), words_text(rng, 60)]
        recs += [Document(t, f"builtin:module/{name}", group=group) for t in docs]
        recs.append(Document(f"def f{i}():\n    return {i}\n", f"builtin:code/{name}",
                             group=group, train_only=True))
        answer = " ".join(docs[0].split()[:25])
        recs.append(Conversation((("user", f"What is the Python `{name}` module for?"),
                                  ("assistant", answer)), "builtin:doc/module", "doc", answer,
                                 pool=(group,)))
    return recs


def test_collect_keeps_each_group_in_one_split_with_its_questions():
    cfg = FetchConfig(val_fraction=0.2, test_fraction=0.2)
    recs = builtin_like()
    tables, stats = collect(recs, cfg)
    where = splits_of_keys(tables)
    assert all(len(s) == 1 for s in where.values()), {k: s for k, s in where.items()
                                                        if len(s) > 1}
    split = {k: next(iter(s)) for k, s in where.items()}
    groups = {f"module:mod{i:02d}" for i in range(40)}
    assert set(split) == groups
    # the split is the group's hash (nothing was merged, no group had to move)
    assert all(split[g] == split_of(g, 0.2, 0.2) for g in groups)
    assert set(split.values()) == set(SPLITS)
    for s in SPLITS:
        # every document of the split's groups is there, and every question about them
        assert {r["pool"][0] for r in tables[f"pretrain_{s}"]} == {
            g for g in groups if split[g] == s}
        assert {r["pool"][0] for r in tables[f"sft_{s}"]} == {
            g for g in groups if split[g] == s}
        for row in tables[f"sft_{s}"]:  # the answer is cut from a document of its split
            assert any(row["answer"] in d["text"] for d in tables[f"pretrain_{s}"]
                       if d["pool"] == row["pool"])
    # the code of a held-out module is in no split; a trained module's code trains
    held = [g for g in groups if split[g] != "train"]
    assert stats.held_out_dropped == len(held) > 0
    code = [r for rows in tables.values() for r in rows if r["source"].startswith("builtin:code")]
    assert {r["pool"][0] for r in code} == {g for g in groups if split[g] == "train"}
    assert all(r in tables["pretrain_train"] for r in code)
    assert stats.documents == {s: len(tables[f"pretrain_{s}"]) for s in SPLITS}
    assert sum(stats.documents.values()) == 2 * 40 + 40 - len(held)
    assert pool_breach(tables) is None


def test_collect_puts_near_copies_of_two_groups_in_one_split():
    rng = random.Random(3)
    recs = builtin_like(20)
    text = words_text(rng, 200).split()
    copy = list(text)
    copy[100] = "different"
    # two groups that hash to different splits, made near-copies of each other
    a = held_out_key("module:copy_a", "train", 0.2, 0.2)
    b = held_out_key("module:copy_b", "test", 0.2, 0.2)
    recs += [Document(" ".join(text), "builtin:module/a", group=a),
             Document(" ".join(copy), "builtin:module/b", group=b),
             Conversation((("user", "What is b?"), ("assistant", copy[0])), "builtin:doc/module",
                          "doc", copy[0], pool=(b,))]
    tables, _ = collect(recs, FetchConfig(val_fraction=0.2, test_fraction=0.2))
    found = [(name.rsplit("_", 1)[1], r) for name, rows in tables.items() for r in rows
             if r["source"] in ("builtin:module/a", "builtin:module/b")
             or r.get("answer") == copy[0]]
    assert len(found) == 3  # both documents and the question about b
    # one split, the merged group's (its smaller name's) key and split
    assert all(r["pool"] == [min(a, b)] for _, r in found)
    assert {s for s, _ in found} == {split_of(min(a, b), 0.2, 0.2)}
    assert pool_breach(tables) is None


def test_pool_breach_names_a_key_planted_in_two_splits():
    tables, _ = collect(builtin_like(), FetchConfig(val_fraction=0.2, test_fraction=0.2))
    assert pool_breach(tables) is None
    key = tables["pretrain_train"][0]["pool"][0]
    planted = {name: list(rows) for name, rows in tables.items()}
    planted["sft_test"].append({"id": "f" * 64, "pool": ["word:other", key]})
    breach = pool_breach(planted)
    assert breach is not None and repr(key) in breach
    assert "pretrain_train" in breach and "sft_test" in breach
    # a key twice in one split is no breach; in val and test (two held-out splits) it is
    assert pool_breach({"pretrain_val": [{"id": "1", "pool": ["k"]}],
                        "sft_val": [{"id": "2", "pool": ["k"]}]}) is None
    assert "'k'" in pool_breach({"pretrain_val": [{"id": "1", "pool": ["k"]}],
                                 "sft_test": [{"id": "2", "pool": ["k"]}]})
    # a preference pair is read without its id: the breach names its place instead
    pairs = [{"prompt": [], "pool": ["x"]}, {"prompt": [], "pool": ["k"]}]
    assert "preferences_val (row #1)" in pool_breach(
        {"preferences_train": [{"prompt": [], "pool": ["k"]}], "preferences_val": pairs})
    # rows without keys (a table of another kind) are no breach
    assert pool_breach({"pretrain_train": [{"id": "1", "pool": []}],
                        "pretrain_test": [{"id": "2", "pool": None}]}) is None


def test_collect_fails_when_a_fixed_split_conversation_meets_a_held_out_group():
    cfg = FetchConfig(val_fraction=0.2, test_fraction=0.2)
    group = held_out_key("module:held", "test", 0.2, 0.2)
    trained_group = held_out_key("module:trained", "train", 0.2, 0.2)
    val_group = held_out_key("module:val", "val", 0.2, 0.2)
    rng = random.Random(4)
    docs = [Document(words_text(rng, 40), f"builtin:module/{g}", group=g)
            for g in (trained_group, val_group, group)]
    # questions about groups of every split, so that the hash's splits stand as they are
    asked = [Conversation((("user", f"About {g}?"), ("assistant", g)), "s", "doc", g, pool=(g,))
             for g in (trained_group, val_group)]
    tables, _ = collect([*docs, *asked], cfg)  # the records alone build
    assert [name for name, rows in tables.items() for r in rows if r["pool"] == [group]] == [
        "pretrain_test"]

    def fixed(question: str, split: str, *pool: str) -> Conversation:
        return Conversation((("user", question), ("assistant", "x")), "s", "doc", "x",
                            split=split, pool=pool)

    trained = fixed("q1", "train", group)
    # the group held out by a fixed split of its document, a fixed training question about it
    docs_fixed = [*docs[:2], Document(words_text(rng, 40), "x", split="test", group=group)]
    with pytest.raises(CorpusError, match=rf"split contract broken.*'{group}' is in"):
        collect([*docs_fixed, *asked, trained], cfg)
    # a fixed training question and a fixed test question about one group
    with pytest.raises(CorpusError, match=rf"'{group}' is in"):
        collect([*docs, *asked, trained, fixed("q2", "test", group)], cfg)
    # a question about two things: its first key's group is held out (test), the second
    # key is trained by a fixed question
    both = Conversation((("user", "q3"), ("assistant", "c")), "s", "doc", "c",
                        pool=(group, "word:trained"))
    with pytest.raises(CorpusError, match="'word:trained' is in"):
        collect([*docs, *asked, both, fixed("q4", "train", "word:trained")], cfg)
    # near-copies: a trained question's group and a tested question's group are one group
    text = words_text(rng, 100)
    copies = [Document(text, "x", group="module:p"), Document(text + " end", "x",
                                                              group="module:q")]
    convs = [fixed("p?", "train", "module:p"), fixed("q?", "test", "module:q")]
    with pytest.raises(CorpusError, match="'module:p' is in"):
        collect([*docs, *asked, *copies, *convs], cfg)
    # without the collision the same records build
    tables, _ = collect([*docs, *asked, *copies, convs[0]], cfg)
    assert pool_breach(tables) is None
    assert {name for name, rows in tables.items() for r in rows
            if r["pool"] == ["module:p"]} == {"pretrain_train", "sft_train"}


def test_a_question_follows_its_text_when_its_group_duplicates_another():
    cfg = FetchConfig(val_fraction=0.2, test_fraction=0.2)
    tested = held_out_key("topic:else", "test", 0.2, 0.2)
    trained = held_out_key("topic:if", "train", 0.2, 0.2)
    rng = random.Random(8)
    text = words_text(rng, 60)
    others = [Document(words_text(rng, 40), "x", group=held_out_key(f"module:{s}", s, 0.2, 0.2))
              for s in SPLITS]
    recs = [*others, Document(text, "topic/else", group=tested),
            Document(text, "topic/if", group=trained),  # the same text: dropped
            Conversation((("user", "Explain if."), ("assistant", text)), "doc", "doc", text,
                         pool=(trained,))]
    tables, stats = collect(recs, cfg)
    assert stats.duplicates_dropped == 1
    (doc_table,) = [n for n, rows in tables.items() if n.startswith("pretrain") for r in rows
                    if r["text"] == text]
    (sft_table,) = [n for n, rows in tables.items() if n.startswith("sft") for r in rows
                    if r["answer"] == text]
    assert doc_table == "pretrain_test"
    assert sft_table == "sft_test"  # with the only document that answers it


def test_adding_documents_moves_no_other_document():
    rng = random.Random(6)
    first = [Document(words_text(rng, 30), "f") for _ in range(60)]
    more = [Document(words_text(rng, 30), "f") for _ in range(60)]
    cfg = FetchConfig(doc_questions=False, synthetic_per_task=0)

    def split_by_text(recs):
        tables, _ = collect(recs, cfg)
        return {r["text"]: s for s in SPLITS for r in tables[f"pretrain_{s}"]}

    before, after = split_by_text(first), split_by_text(more + first)
    assert {t: after[t] for t in before} == before
    assert set(before.values()) == set(SPLITS)


def test_a_small_corpus_always_keeps_a_training_document():
    cfg = FetchConfig(doc_questions=False, synthetic_per_task=0)
    for texts in (["doc 0", "doc 6"],  # train and test by their hash
                  ["doc 6", "doc 12", "doc 13"]):  # all three test
        tables, _ = collect([Document(t, "f") for t in texts], cfg)
        assert tables["pretrain_train"] and tables["pretrain_val"], texts


# --- the whole builtin corpus (once) --------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_tables():
    from llmcore.data.pydocs import builtin_documents, doc_conversations

    recs = [*builtin_documents(), *doc_conversations(),
            *synthetic_conversations(20, seed=0, val_per_task=5, test_per_task=5)]
    return collect(recs, FetchConfig())


def test_the_builtin_corpus_keeps_its_contract(builtin_tables):
    tables, stats = builtin_tables
    assert pool_breach(tables) is None
    where = splits_of_keys(tables)
    assert all(len(s) == 1 for s in where.values())
    groups = Counter(next(iter(s)) for k, s in where.items()
                     if k.startswith(("module:", "topic:")))
    total = sum(groups.values())
    for s in HELD_OUT:  # about a tenth of the groups each
        assert 0.03 * total < groups[s] < 0.2 * total, groups
    # a doc question is about a group whose documents are in its split (or whose documents
    # were all dropped as exact copies of another group's: their groups join the copy's)
    with_docs = {r["pool"][0] for s in SPLITS for r in tables[f"pretrain_{s}"]}
    for s in SPLITS:
        doc_groups = {r["pool"][0] for r in tables[f"pretrain_{s}"]}
        asked = {r["pool"][0] for r in tables[f"sft_{s}"] if r["task"] == "doc"}
        assert asked and asked - doc_groups <= asked - with_docs, s
    # and the text its answer is cut from is in no other split (topics and module docstrings
    # are in their documents word for word)
    held_out_texts = "\n\0".join(r["text"] for s in HELD_OUT for r in tables[f"pretrain_{s}"])
    trained_answers = [r["answer"] for r in tables["sft_train"] if r["task"] == "doc"]
    assert not [a for a in trained_answers if a in held_out_texts]
    train_texts = "\n\0".join(r["text"] for r in tables["pretrain_train"])
    for s in HELD_OUT:
        answers = [r["answer"] for r in tables[f"sft_{s}"] if r["task"] == "doc"]
        assert answers and not [a for a in answers if a in train_texts], s
    # near-copies were merged: some topics carry another group's key
    topics = [r for rows in tables.values() for r in rows
              if r["source"].startswith("builtin:topic/")]
    merged = [r for r in topics if r["pool"] != [f"topic:{r['source'].split('/', 1)[1]}"]]
    assert topics and merged
    assert stats.held_out_dropped == 0  # no code asked for
    synthetic = Counter((r["task"], s) for s in SPLITS for r in tables[f"sft_{s}"]
                        if r["task"] in SYNTHETIC_TASKS)
    assert all(synthetic[(t, s)] == 5 for t in SYNTHETIC_TASKS for s in HELD_OUT)


# --- user data, on disk ------------------------------------------------------------------


def test_user_files_get_three_split_files_with_pool_columns(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = random.Random(7)
    texts = [f"User document {i}. {words_text(rng, 40)}" for i in range(40)]
    for i, t in enumerate(texts[:30]):
        (d / f"doc{i:02d}.txt").write_text(t)
    chats = [[{"role": "user", "content": f"question {i}?"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(40)]
    lines = [{"text": t} for t in texts[30:]] + [{"messages": m} for m in chats]
    (d / "more.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = FetchConfig(source="files", paths=[str(d)], doc_questions=False, synthetic_per_task=0,
                      val_fraction=0.2, test_fraction=0.2)
    out = tmp_path / "corpus"
    stats = build_corpus(cfg, out)
    for table in ("pretrain", "sft"):
        for s in SPLITS:
            path = out / f"{table}_{s}.parquet"
            read = pq.read_table(path)
            assert "pool" in read.column_names and read.num_rows > 0, path
            assert all(len(p) == 1 for p in read.column("pool").to_pylist()), path
    docs = {s: read_documents(out, s) for s in SPLITS}
    assert sorted(r["text"] for rows in docs.values() for r in rows) == sorted(texts)
    assert {s: len(rows) for s, rows in docs.items()} == stats.documents
    for s, rows in docs.items():  # a document's key is its content
        for r in rows:
            assert r["pool"] == [f"doc:{content_hash(r['text'])}"]
            assert split_of(r["pool"][0], 0.2, 0.2) == s
    convs = {s: read_conversations(out, s) for s in SPLITS}
    assert sum(map(len, convs.values())) == 40
    for s, rows in convs.items():
        for r in rows:
            assert r["pool"] == [f"conversation:{r['id']}"]
            assert split_of(r["pool"][0], 0.2, 0.2) == s
    keys = defaultdict(set)
    for s in SPLITS:
        for path in (out / f"pretrain_{s}.parquet", out / f"sft_{s}.parquet"):
            for pool in pq.read_table(path, columns=["pool"]).column("pool").to_pylist():
                for k in pool:
                    keys[k].add(s)
    assert all(len(v) == 1 for v in keys.values())


def test_the_default_test_split_meets_every_minimum(builtin_tables):
    """The sizes the contracts promise (MIN_TEST_EXAMPLES), met by the builtin corpus with the
    default fetch params: 250 questions per task, its doc questions and documents."""
    from llmcore.data.splits import MIN_TEST_EXAMPLES

    tables, _ = builtin_tables
    test = tables["sft_test"]
    assert sum(r["task"] == "doc" for r in test) >= MIN_TEST_EXAMPLES["doc_questions"]
    assert len(tables["pretrain_test"]) >= MIN_TEST_EXAMPLES["docs_test"]
    tasks = list(synthetic_conversations(0, seed=0, test_per_task=250))
    for task in ("arithmetic", "spell", "count", "reverse"):
        assert sum(c.task == task for c in tasks) >= MIN_TEST_EXAMPLES[task], task


def test_the_showcase_prompts_name_their_split(builtin_tables):
    """The README's samples (evaluate.prompts) are the README's three questions (whose
    subjects may be trained: the page shows the split beside each), then a test pair, a spell
    and a reverse question on test words and test documents; every task subject's split,
    as the page reports it, is the pool it is really in."""
    import re

    import yaml

    from llmcore.data.pydocs import module_group
    from llmcore.data.tasks import question_subject
    from tests.conftest import REPO

    tables, _ = builtin_tables
    prompts = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["prompts"]
    assert prompts[:3] == ["What is 12 + 7?", "Spell the word 'python'.",
                           "Reverse the letters of the word 'stack'."]
    pools = task_pools()
    test_groups = {r["pool"][0] for r in tables["pretrain_test"]}
    held_out_tasks = set()
    for prompt in prompts:
        subject = question_subject(prompt)
        if subject is not None:
            key, split = subject
            kind, _, value = key.partition(":")
            where = {s for s, p in pools.items()
                     if (value in p.words if kind == "word" else
                         tuple(map(int, value.split(","))) in p.pairs)}
            assert where == {split}, (prompt, where, split)
            if split == "test":
                held_out_tasks.add(prompt.split()[0])
        elif m := re.search(r"`([\w.]+)`", prompt):
            assert module_group(m.group(1)) in test_groups, prompt
        else:
            raise AssertionError(f"a prompt about nothing the test knows: {prompt}")
    assert {"What", "Spell", "Reverse"} <= held_out_tasks
