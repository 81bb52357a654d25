"""The contract check: n-gram hashes against a plain tuple reference, duplicates planted in
each training stream found (and only they), the 13-word boundary, examples shorter than n, a
copy and a pool breach each named as the first violation, and the metrics without the
examples that share a run."""

import json
import random

import numpy as np
import pytest

from llmcore.data.packing import pack_all
from llmcore.data.shards import ShardDataset
from llmcore.eval.contamination import (
    NgramIndex,
    Words,
    check_set,
    contamination_metrics,
    contamination_report,
    decontaminate,
    evaluation_sets,
    first_violation,
    gram_hashes,
)
from llmcore.eval.evaluate import clean_metrics
from llmcore.report.tables import clean_comparison

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


def prose(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n)) + "."


def test_gram_hashes_are_equal_exactly_where_the_windows_are():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=400)  # a small alphabet: many windows repeat
    for n in (1, 3, 5):
        hashes = gram_hashes(ids, n)
        windows = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        assert len(hashes) == len(windows)
        by_hash: dict[int, set] = {}
        for h, w in zip(hashes.tolist(), windows, strict=True):
            by_hash.setdefault(h, set()).add(w)
        assert all(len(ws) == 1 for ws in by_hash.values())  # no two windows share a hash
        assert len(by_hash) == len(set(windows))  # equal windows share one
    assert len(gram_hashes(ids[:4], 5)) == 0


def test_an_index_holds_the_runs_of_each_segment_and_none_across_two():
    index = NgramIndex([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4, 5])])
    asked = np.concatenate([gram_hashes(np.array(r), 2) for r in
                            ([1, 2], [2, 3], [4, 5], [3, 4], [5, 1], [2, 1])])
    # [3, 4] runs from the first segment into the last: no stream window holds it
    assert index.contains(2, asked).tolist() == [True, True, True, False, False, False]
    assert index.contains(3, gram_hashes(np.array([1, 2, 3]), 3)).tolist() == [True]
    assert index.contains(3, gram_hashes(np.array([3, 4, 5]), 3)).tolist() == [False]
    assert index.contains(4, gram_hashes(np.array([1, 2, 3, 4]), 4)).tolist() == [False]
    # asking twice for one run answers both; asking nothing answers nothing
    twice = np.concatenate([gram_hashes(np.array([4, 5]), 2)] * 2)
    assert index.contains(2, twice).tolist() == [True, True]
    assert index.contains(2, np.empty(0, dtype=np.uint64)).tolist() == []
    assert NgramIndex([]).contains(1, gram_hashes(np.array([1]), 1)).tolist() == [False]


def test_the_13_word_boundary_short_examples_and_spelling_differences():
    words = Words()
    train = prose(1, 200)
    index = {"pretrain": NgramIndex([words(train)])}
    tw = train.split()
    examples = [
        words(" ".join(tw[50:62]) + " unseen words here and more"),  # 12 shared words: clean
        words(" ".join(tw[80:93]) + " unseen words here"),  # 13 shared words: flagged
        words(" ".join(tw[100:140]).upper().replace(" ", ", ")),  # case and commas differ
        words(" ".join(tw[10:15])),  # shorter than 13 words, inside the stream: flagged
        words(" ".join([tw[10], tw[12], tw[11]])),  # short, not a run of the stream: clean
        words(""),
    ]
    r = check_set("set", examples, index, words)
    assert r.found["pretrain"].tolist() == [False, True, True, True, False, False]
    assert r.overlap[2] == 1.0 and r.overlap[1] == pytest.approx(1 / 4)
    assert r.matches[1] == " ".join(tw[80:93]).lower()
    assert r.matches[0] is None


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    """A corpus where one example of each evaluation set leaked through one stream."""
    tok = tiny_tokenizer

    def conv(task, q, a, system=False):
        msgs = ([{"role": "system", "content": "You are a helpful assistant."}] if system
                else []) + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": msgs, "task": task, "answer": a}

    val = [conv("spell", "Spell the word 'zebra'.", "z-e-b-r-a"),
           conv("spell", "Spell the word 'quokka'.", "q-u-o-k-k-a"),
           conv("spell", "Spell the word 'narwhal'.", "n-a-r-w-h-a-l"),
           conv("doc", "What does the planted module do?", prose(7, 30)),
           conv("doc", "What does the fresh module do?", prose(8, 30)),
           conv("doc", "What does the near module do?", prose(9, 30))]
    train_docs = [prose(s, 120) for s in range(10, 20)]
    # the doc answer inside a pretraining document, in capitals and with commas
    train_docs.append(prose(20, 50) + " " + val[3]["answer"].upper().replace(" ", ", "))
    # 12 words of the third doc answer: one short of a leak
    train_docs.append(" ".join(val[5]["answer"].split()[5:17]) + " " + prose(21, 40))
    val_docs = [train_docs[2], prose(30, 400)]  # a copied document and a fresh one
    train_convs = [conv("spell", f"Spell the word '{w}'.", "-".join(w)) for w in WORDS]
    train_convs.append(conv("spell", "Spell the word 'zebra'.", "z-e-b-r-a", system=True))
    preferences = [{"prompt": [{"role": "user", "content": "Spell the word 'quokka'."}],
                    "chosen": "q-u-o-k-k-a", "rejected": "q-u-o-k-a", "source": "t"}]
    out = tmp_path_factory.mktemp("planted")
    pack_all(tok, {"train": train_docs}, {"train": [c["messages"] for c in train_convs]}, out,
             seq_len=256)
    sets = evaluation_sets({"spell": val[:3]}, val[3:], val_docs, [], [])
    results = decontaminate(
        tok, sets, train_conversations=train_convs, preferences=preferences,
        pretrain_train=ShardDataset(out, "pretrain_train"),
        sft_train=ShardDataset(out, "sft_train"))
    return results, sets, tok


def test_planted_duplicates_are_found_in_their_stream_only(planted):
    results, _, _ = planted
    spell, doc, docs_test = results["spell"], results["doc_questions"], results["docs_test"]
    # zebra: an SFT conversation (with a system prompt the check leaves out); quokka: a
    # preference pair; narwhal: nowhere
    assert spell.found["sft"].tolist() == [True, False, False]
    assert spell.found["align"].tolist() == [True, True, False]  # zebra: a task conversation
    assert spell.found["pretrain"].tolist() == [False, False, False]  # no chat mix here
    assert spell.contaminated.tolist() == [True, True, False]
    assert doc.found["pretrain"].tolist() == [True, False, False]
    # 38 words (role names, question, 30-word answer): 26 runs, the answer's own 18 leaked
    assert doc.overlap[0] == pytest.approx(18 / 26) and doc.overlap[2] == 0.0
    # docs_test: the copied document is flagged, wholly, the fresh one is not
    assert docs_test.contaminated.tolist() == [True, False]
    assert docs_test.overlap[0] == 1.0 and docs_test.overlap[1] == 0.0


def test_the_first_violation_names_the_set_and_the_copied_example(planted):
    results, sets, _ = planted
    line = first_violation(results, {}, sets)
    # zebra's whole example is in training (one run: overlap 1.0): the first set checked
    assert line.startswith("set 'spell': example 0 (") and "zebra" in line
    assert "covering 100% of its runs" in line and "sft" in line
    # a doc answer sharing 18 of its 26 runs (69%) is a copy too; a 12-word run is not
    assert results["doc_questions"].overlap[0] >= 0.5 > results["doc_questions"].overlap[2]
    only_docs = {k: v for k, v in results.items() if k != "spell"}
    assert first_violation(only_docs, {}, sets).startswith("set 'doc_questions': example 0")


def test_a_shared_sentence_is_counted_but_is_no_violation(planted):
    results, sets, _ = planted
    doc = results["doc_questions"]
    keep = np.array([False, True, True])  # the fresh and the near question only
    partial = {"doc_questions": type(doc)("doc_questions",
                                          {s: f[keep] for s, f in doc.found.items()},
                                          doc.overlap[keep])}
    assert first_violation(partial, {}, {"doc_questions": sets["doc_questions"][1:]}) is None


def test_a_pool_key_in_two_splits_is_a_violation_before_any_copy(planted):
    results, sets, _ = planted
    tables = {"sft_train": [{"id": "a" * 64, "pool": ["word:zebra"]}],
              "sft_test": [{"id": "b" * 64, "pool": ["word:okapi"]},
                           {"id": "c" * 64, "pool": ["word:zebra"]}]}
    line = first_violation(results, tables, sets)
    assert line.startswith("pool breach: 'word:zebra' is in sft_test and in sft_train")
    tables["sft_test"].pop()
    assert not first_violation({}, tables, sets)


def test_the_report_lists_every_contaminated_example(planted):
    results = planted[0]
    data, page = contamination_report(results)
    assert data["ngram"] == 13 and data["unit"] == "words"
    assert data["sets"]["spell"]["contaminated"] == 2
    assert data["sets"]["spell"]["by_stream"] == {"pretrain": 0, "sft": 1, "align": 2}
    listed = [(e["set"], e["index"]) for e in data["examples"]]
    assert ("spell", 0) in listed and ("spell", 1) in listed and ("spell", 2) not in listed
    assert ("doc_questions", 0) in listed and ("doc_questions", 2) not in listed
    assert "| spell | 3 | 2 |" in page
    json.dumps(data)  # writable as it is
    metrics = contamination_metrics(results)
    assert metrics["evaluate/contamination/spell/contaminated"] == 2
    assert metrics["evaluate/contamination/doc_questions/pretrain"] == 1


def test_clean_metrics_drop_the_flagged_examples():
    results = {"sft": {"tasks": {"spell": {"correct": [True, True, False, False]}},
                       "doc_mc": {"correct": [True, False]}}}
    flags = {"spell": [True, False, False, True], "doc_questions": [False, False]}
    m = clean_metrics(results, flags)
    assert m["evaluate/sft/spell_exact_match_clean"] == 0.5
    assert m["evaluate/sft/spell_exact_match_clean_n"] == 2
    assert m["evaluate/sft/doc_mc_accuracy_clean"] == 0.5
    every = clean_metrics(results, {"spell": [True] * 4, "doc_questions": [True, True]})
    assert every["evaluate/sft/spell_exact_match_clean"] is None
    assert every["evaluate/sft/spell_exact_match_clean_n"] == 0
    table = clean_comparison({**m, "evaluate/sft/spell_exact_match": 0.5}, ["sft"])
    assert "| spell_exact_match | 0.500 / 0.500 (n=2) |" in table
    with pytest.raises(ValueError, match="3 contamination flags for 4"):
        clean_metrics(results, {"spell": [True] * 3})
