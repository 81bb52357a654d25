"""Preference pairs: the three input layouts, malformed rows, and the fetch stage's tables."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmcore.config.fetch import FetchConfig
from llmcore.data.corpus import BadRecord, CorpusError, read_preferences, read_texts
from llmcore.data.fetch import build_corpus
from llmcore.data.preferences import PreferencePair, parse_preference, read_preferences_file
from llmcore.data.sources import content_hash
from llmcore.data.splits import SPLITS, split_of


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


Q, GOOD, BAD = "What is 2+2?", "4", "5"
MINIMIND = {"chosen": [msg("user", Q), msg("assistant", GOOD)],
            "rejected": [msg("user", Q), msg("assistant", BAD)]}
TRL_STRINGS = {"prompt": Q, "chosen": GOOD, "rejected": BAD}
TRL_MESSAGES = {"prompt": [msg("user", Q)], "chosen": [msg("assistant", GOOD)],
                "rejected": [msg("assistant", BAD)]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def pair_row(i: int) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"right answer {i}", "rejected": f"wrong {i}"}


def project(tmp_path: Path, **kw) -> FetchConfig:
    """Two documents under ``tmp_path/docs`` (a corpus needs some) and a config reading them;
    preference files go under ``tmp_path/prefs``."""
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "docs/a.txt").write_text("A first document.")
    (tmp_path / "docs/b.txt").write_text("A second document.")
    base = dict(source="files", paths=["docs"], doc_questions=False, synthetic_per_task=0,
                val_fraction=0.2)
    return FetchConfig(**{**base, **kw})


def all_pairs(out: Path) -> list[dict]:
    return [p for s in SPLITS for p in read_preferences(out, s)]


def prompt_key(prompt: list[dict]) -> str:
    """The pool key of a pair: the hash of its prompt messages."""
    return f"prompt:{content_hash(tuple((m['role'], m['content']) for m in prompt))}"


# --- the layouts --------------------------------------------------------------------------


def test_every_layout_gives_the_same_pair():
    want = PreferencePair((("user", Q),), GOOD, BAD, "src")
    for row in (MINIMIND, TRL_STRINGS, TRL_MESSAGES):
        assert parse_preference(row, "f:1", "src") == want
    # mixed: a string prompt with message replies, and message prompt with string replies
    mixed = {"prompt": Q, "chosen": [msg("assistant", GOOD)], "rejected": BAD}
    assert parse_preference(mixed, "f:1", "src") == want


def test_multi_turn_prompt_with_a_system_message_is_kept_whole():
    prefix = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello."),
              msg("user", Q)]
    row = {"chosen": prefix + [msg("assistant", GOOD)],
           "rejected": prefix + [msg("assistant", BAD)]}
    pair = parse_preference(row, "f:1", "src")
    assert pair.prompt == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."),
                           ("user", Q))
    assert (pair.chosen, pair.rejected) == (GOOD, BAD)
    explicit = parse_preference({"prompt": prefix, "chosen": GOOD, "rejected": BAD}, "f:1", "src")
    assert explicit == pair


MALFORMED = [
    ([TRL_STRINGS], "expected a JSON object, got list"),
    ({"prompt": Q, "rejected": BAD}, "missing field 'chosen'"),
    ({"prompt": Q, "chosen": GOOD, "rejected": None}, "missing field 'rejected'"),
    ({"chosen": GOOD, "rejected": BAD}, "missing field 'prompt'"),
    ({"prompt": 7, "chosen": GOOD, "rejected": BAD}, "prompt must be a string or a list"),
    ({"prompt": Q, "chosen": 4, "rejected": BAD}, "chosen must be a string or a list"),
    ({**TRL_MESSAGES, "rejected": [msg("assistant", 5)]},
     "rejected: message 0 content must be a string"),
    ({**TRL_MESSAGES, "prompt": [msg("user", None)]}, "prompt: message 0 content must be a string"),
    ({"prompt": Q, "chosen": "  \n", "rejected": BAD}, "the chosen reply is empty"),
    ({"prompt": Q, "chosen": GOOD, "rejected": ""}, "the rejected reply is empty"),
    ({"prompt": Q, "chosen": GOOD, "rejected": GOOD + " "}, "chosen and rejected are the same"),
    ({**TRL_MESSAGES, "prompt": [msg("robot", Q)]}, "prompt: message 0 has role 'robot'"),
    ({"chosen": [msg("user", Q), msg("critic", GOOD)], "rejected": MINIMIND["rejected"]},
     "chosen: message 1 has role 'critic'"),
    ({**TRL_MESSAGES, "prompt": [msg("user", Q), msg("system", "late")]},
     "prompt: message 1: a system message may only come first"),
    ({**TRL_MESSAGES, "prompt": [msg("user", Q), msg("assistant", "hm")]},
     "the prompt must end with a user message"),
    ({**TRL_MESSAGES, "prompt": [msg("system", "Be brief.")]},
     "the prompt must end with a user message"),
    ({"prompt": "   ", "chosen": GOOD, "rejected": BAD}, "the prompt's last user message is empty"),
    ({"prompt": [], "chosen": GOOD, "rejected": BAD}, "prompt: messages must be a non-empty list"),
    ({**TRL_MESSAGES, "chosen": [msg("user", Q), msg("assistant", GOOD)]},
     "chosen must be exactly one assistant message"),
    ({**TRL_MESSAGES, "rejected": [msg("user", BAD)]},
     "rejected must be exactly one assistant message"),
    ({"chosen": MINIMIND["chosen"], "rejected": [msg("user", "Other?"), msg("assistant", BAD)]},
     "chosen and rejected must share the prompt"),
    ({"chosen": [msg("user", Q)], "rejected": MINIMIND["rejected"]},
     "chosen must end with an assistant message"),
    ({"chosen": [msg("assistant", GOOD)], "rejected": [msg("assistant", BAD)]},
     "the prompt must end with a user message"),
    ({"chosen": MINIMIND["chosen"], "rejected": "nope"}, "missing field 'prompt'"),
]


@pytest.mark.parametrize(("row", "reason"), MALFORMED)
def test_malformed_rows_say_what_is_wrong(row, reason):
    with pytest.raises(BadRecord) as info:
        parse_preference(row, "dpo.jsonl:7", "src")
    assert info.value.location == "dpo.jsonl:7"
    assert reason in info.value.reason


# --- files --------------------------------------------------------------------------------


def test_jsonl_file_yields_pairs_and_bad_records_with_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        MINIMIND, b"\n", b"{not json\n", TRL_STRINGS, b"\xff\xfe\n", {"prompt": Q},
    ])
    recs = list(read_preferences_file(path))
    pair = PreferencePair((("user", Q),), GOOD, BAD, f"file:{path}")
    assert [r for r in recs if isinstance(r, PreferencePair)] == [pair, pair]
    bad = [str(r) for r in recs if isinstance(r, BadRecord)]
    assert bad == [f"{path}:3: invalid JSON (Expecting property name enclosed in double quotes)",
                   f"{path}:5: invalid UTF-8 at byte 0",
                   f"{path}:6: missing field 'chosen'"]


def test_parquet_files_in_both_layouts(tmp_path):
    strings = tmp_path / "trl.parquet"
    pq.write_table(pa.Table.from_pylist([TRL_STRINGS, {**TRL_STRINGS, "rejected": GOOD}]),
                   strings)
    conversations = tmp_path / "minimind.parquet"
    pq.write_table(pa.Table.from_pylist([MINIMIND]), conversations)
    recs = list(read_preferences_file(strings))
    assert recs[0] == PreferencePair((("user", Q),), GOOD, BAD, f"file:{strings}")
    assert isinstance(recs[1], BadRecord)
    assert str(recs[1]) == f"{strings}:row 1: chosen and rejected are the same reply"
    (pair,) = read_preferences_file(conversations)
    assert (pair.prompt, pair.chosen, pair.rejected) == ((("user", Q),), GOOD, BAD)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    (bad,) = read_preferences_file(garbage)
    assert isinstance(bad, BadRecord) and bad.location == str(garbage)
    assert "unreadable Parquet file" in bad.reason


# --- the fetch stage ----------------------------------------------------------------------


def test_fetch_writes_pairs_that_read_back(tmp_path):
    write_jsonl(tmp_path / "prefs/minimind.jsonl", [MINIMIND])
    pq.write_table(pa.Table.from_pylist([pair_row(i) for i in range(20)]),
                   tmp_path / "prefs/more.parquet")
    cfg = project(tmp_path, preference_paths=["prefs/*.jsonl", "prefs/*.parquet"])
    out = tmp_path / "corpus"
    stats = build_corpus(cfg, out, root=tmp_path)
    pairs = all_pairs(out)
    assert len(pairs) == 21
    first = next(p for p in pairs if p["chosen"] == GOOD)
    prompt = [{"role": "user", "content": Q}]
    assert first == {"prompt": prompt, "chosen": GOOD, "rejected": BAD,
                     "source": f"file:{tmp_path / 'prefs/minimind.jsonl'}",
                     "pool": [prompt_key(prompt)]}
    assert {p["chosen"] for p in pairs} == {GOOD} | {f"right answer {i}" for i in range(20)}
    metrics = stats.metrics()
    assert metrics["fetch/preference_pairs"] == 21
    for s in SPLITS:
        assert metrics[f"fetch/preference_pairs_{s}"] == len(read_preferences(out, s)) > 0, s
    manifest = json.loads((out / "manifest.json").read_text())
    for s in SPLITS:
        assert manifest["tables"][f"preferences_{s}"]["file"] == f"preferences_{s}.parquet"
    assert sum(manifest["tables"][f"preferences_{s}"]["rows"] for s in SPLITS) == 21
    # the documents are untouched by the pairs
    assert sorted(t for s in SPLITS for t in read_texts(out, s)) == [
        "A first document.", "A second document."]
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        read_preferences(out, "dev")


def test_duplicates_are_dropped_across_files_and_layouts(tmp_path):
    write_jsonl(tmp_path / "prefs/a.jsonl", [MINIMIND, TRL_STRINGS, pair_row(1)])
    write_jsonl(tmp_path / "prefs/b.jsonl", [TRL_MESSAGES, pair_row(1), pair_row(2)])
    stats = build_corpus(project(tmp_path, preference_paths=["prefs"]), tmp_path / "corpus",
                         root=tmp_path)
    pairs = all_pairs(tmp_path / "corpus")
    assert sorted(p["chosen"] for p in pairs) == [GOOD, "right answer 1", "right answer 2"]
    assert stats.preference_duplicates_dropped == 3
    assert stats.metrics()["fetch/duplicates_dropped"] == 3
    assert stats.metrics()["fetch/preference_pairs"] == 3


def test_malformed_pairs_are_counted_skipped_and_listed(tmp_path):
    prefs = write_jsonl(tmp_path / "prefs/dpo.jsonl", [
        pair_row(0), {"prompt": Q, "chosen": GOOD, "rejected": GOOD}, b"garbage\n",
        {**TRL_MESSAGES, "prompt": [msg("robot", Q)]}, pair_row(1)])
    write_jsonl(tmp_path / "docs/c.jsonl", [{"nothing": 1}])  # a malformed document too
    out = tmp_path / "corpus"
    stats = build_corpus(project(tmp_path, preference_paths=["prefs/dpo.jsonl"]), out,
                         root=tmp_path)
    assert sorted(p["chosen"] for p in all_pairs(out)) == ["right answer 0", "right answer 1"]
    assert stats.bad_records == 4 and stats.metrics()["fetch/bad_records"] == 4
    listed = (out / "bad_records.txt").read_text().splitlines()
    assert listed[0].startswith(f"{tmp_path / 'docs/c.jsonl'}:1: record has none")
    assert listed[1:] == [f"{prefs}:2: chosen and rejected are the same reply",
                          f"{prefs}:3: invalid JSON (Expecting value)",
                          f"{prefs}:4: prompt: message 0 has role 'robot' (allowed: system, "
                          "user, assistant)"]
    assert stats.bad_examples == listed


def test_strict_fails_on_the_first_malformed_pair_naming_file_and_line(tmp_path):
    prefs = write_jsonl(tmp_path / "prefs/dpo.jsonl", [pair_row(0), {"prompt": Q}, b"oops\n"])
    cfg = project(tmp_path, preference_paths=["prefs/dpo.jsonl"], strict=True)
    with pytest.raises(CorpusError) as info:
        build_corpus(cfg, tmp_path / "corpus", root=tmp_path)
    assert str(info.value) == (f"malformed record at {prefs}:2: missing field 'chosen' "
                               "(fetch.strict is true)")
    assert not (tmp_path / "corpus").exists()


def test_a_missing_or_wrong_file_names_the_param_before_any_work(tmp_path):
    cfg = project(tmp_path, preference_paths=["prefs/*.jsonl"])
    with pytest.raises(CorpusError, match=r"^fetch\.preference_paths: 'prefs/\*\.jsonl' "
                                          r"matches no file$"):
        build_corpus(cfg, tmp_path / "corpus", root=tmp_path)
    (tmp_path / "notes.txt").write_text("a text file is no preference file")
    cfg = project(tmp_path, preference_paths=["notes.txt"])
    with pytest.raises(CorpusError, match=r"fetch\.preference_paths: .*notes\.txt has an "
                                          r"unsupported type \(use \.jsonl, \.parquet\)"):
        build_corpus(cfg, tmp_path / "corpus", root=tmp_path)
    assert not (tmp_path / "corpus").exists()


def test_split_goes_by_prompt_and_is_deterministic(tmp_path):
    rows = [pair_row(i) for i in range(60)]
    rows += [{**pair_row(i), "rejected": f"another wrong {i}"} for i in range(60)]  # same prompts
    write_jsonl(tmp_path / "prefs/dpo.jsonl", rows)
    cfg = project(tmp_path, preference_paths=["prefs/dpo.jsonl"], val_fraction=0.25,
                  test_fraction=0.2)
    build_corpus(cfg, tmp_path / "one", root=tmp_path)
    write_jsonl(tmp_path / "prefs/dpo.jsonl", rows[::-1])  # the same pairs in another order
    build_corpus(cfg, tmp_path / "two", root=tmp_path)
    for split in SPLITS:
        assert read_preferences(tmp_path / "one", split) == read_preferences(tmp_path / "two",
                                                                              split)
    prompts = {}
    for split in SPLITS:
        pairs = read_preferences(tmp_path / "one", split)
        for p in pairs:
            assert p["pool"] == [prompt_key(p["prompt"])]
            assert split_of(p["pool"][0], 0.25, 0.2) == split
        prompts[split] = {p["prompt"][0]["content"] for p in pairs}
        # both pairs of a prompt on one side
        assert len(pairs) == 2 * len(prompts[split]), split
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert sum(map(len, prompts.values())) == 60
    assert 5 <= len(prompts["val"]) <= 25  # about a quarter of the 60 prompts
    assert 4 <= len(prompts["test"]) <= 22  # about a fifth


def test_two_pairs_always_leave_one_for_validation(tmp_path):
    # with a tiny val_fraction (and no test share) the hash puts both in train; the one
    # nearest the line crosses
    write_jsonl(tmp_path / "prefs/dpo.jsonl", [pair_row(1), pair_row(2)])
    out = tmp_path / "corpus"
    build_corpus(project(tmp_path, preference_paths=["prefs/dpo.jsonl"], val_fraction=1e-9,
                         test_fraction=0.0), out, root=tmp_path)
    assert len(read_preferences(out, "train")) == 1 and len(read_preferences(out, "val")) == 1
    assert read_preferences(out, "test") == []


def test_two_pairs_with_one_in_test_still_leave_one_for_training(tmp_path):
    # with the default test share, question 2 hashes to test and question 1 to train; val is
    # empty, and filling it must not empty train
    keys = [prompt_key([msg("user", f"question {i}?")]) for i in (1, 2)]
    assert [split_of(k, 1e-9, 0.1) for k in keys] == ["train", "test"]
    write_jsonl(tmp_path / "prefs/dpo.jsonl", [pair_row(1), pair_row(2)])
    out = tmp_path / "corpus"
    build_corpus(project(tmp_path, preference_paths=["prefs/dpo.jsonl"], val_fraction=1e-9),
                 out, root=tmp_path)
    assert len(read_preferences(out, "train")) == 1 and len(read_preferences(out, "val")) == 1


def test_without_preference_paths_the_corpus_is_as_before(tmp_path):
    out = tmp_path / "corpus"
    stats = build_corpus(project(tmp_path), out, root=tmp_path)
    tables = {f"{t}_{s}" for t in ("pretrain", "sft") for s in SPLITS}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bad_records.txt", "manifest.json", *(f"{t}.parquet" for t in tables)])
    assert set(json.loads((out / "manifest.json").read_text())["tables"]) == tables
    assert all(read_preferences(out, s) == [] for s in SPLITS)
    metrics = stats.metrics()
    assert {k: v for k, v in metrics.items() if "preference" in k} == {
        "fetch/preference_pairs": 0, "fetch/preference_pairs_train": 0,
        "fetch/preference_pairs_val": 0, "fetch/preference_pairs_test": 0}


# --- the stage itself ---------------------------------------------------------------------


def run_fetch(root: Path, fetch: dict, monkeypatch, capsys) -> tuple[int, str]:
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"tracking": "none"},
                                                      "fetch": fetch}))
    # the pipeline the stage runs in: it reads its params list from it
    (root / "dvc.yaml").write_text((Path(__file__).parents[2] / "dvc.yaml").read_text())
    monkeypatch.chdir(root)
    code = 0
    try:
        importlib.import_module("stages.fetch").main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_fetch_stage_reports_pairs_and_fails_clearly(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "prefs/dpo.jsonl", [pair_row(i) for i in range(10)] + [pair_row(0)])
    fetch = dict(source="files", paths=["docs"], doc_questions=False, synthetic_per_task=0,
                 preference_paths=["prefs/*.jsonl"])
    project(tmp_path)
    code, err = run_fetch(tmp_path, fetch, monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics/fetch.json").read_text())
    assert metrics["fetch/preference_pairs"] == 10 and metrics["fetch/duplicates_dropped"] == 1
    val, test = metrics["fetch/preference_pairs_val"], metrics["fetch/preference_pairs_test"]
    assert (f"fetch: 10 preference pairs ({val} val, {test} test), 1 duplicate pairs "
            "dropped") in err
    assert len(all_pairs(tmp_path / "data/corpus")) == 10

    code, err = run_fetch(tmp_path, {**fetch, "preference_paths": ["prefs/missing.jsonl"]},
                          monkeypatch, capsys)
    assert code == 2
    assert "fetch.preference_paths: 'prefs/missing.jsonl' matches no file" in err
    assert "Traceback" not in err


def test_a_pair_utf8_cannot_encode_is_malformed(tmp_path):
    prefs = write_jsonl(tmp_path / "prefs/dpo.jsonl", [
        pair_row(0), {"prompt": Q, "chosen": "right \ud800", "rejected": "wrong"}, pair_row(1)])
    out = tmp_path / "corpus"
    stats = build_corpus(project(tmp_path, preference_paths=["prefs/dpo.jsonl"]), out,
                         root=tmp_path)
    assert sorted(p["chosen"] for p in all_pairs(out)) == ["right answer 0", "right answer 1"]
    assert stats.bad_records == 1
    assert (out / "bad_records.txt").read_text().splitlines() == [
        f"{prefs}:2: record.chosen: character 6 (U+D800) cannot be encoded as UTF-8 (a lone "
        "UTF-16 surrogate); remove or replace it"]
