import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmcore.config.base import parse_sections
from llmcore.config.fetch import FetchConfig
from llmcore.data.assemble import collect
from llmcore.data.corpus import (
    BAD_RECORDS_FILE,
    BadRecord,
    Conversation,
    CorpusError,
    Document,
    expected_answer,
    read_conversations,
    read_texts,
)
from llmcore.data.fetch import build_corpus
from llmcore.data.pydocs import builtin_documents, doc_conversations
from llmcore.data.sources import (
    content_key,
    expand_paths,
    read_file,
    read_hf,
)
from llmcore.data.splits import SPLITS, split_of
from llmcore.data.tasks import final_answer, synthetic_conversations
from llmcore.schema import ConfigError

TASKS = ("arithmetic", "spell", "count", "reverse")


def write_jsonl(path: Path, lines: list) -> Path:
    with path.open("wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def all_texts(out: Path) -> list[str]:
    return [t for s in SPLITS for t in read_texts(out, s)]


def all_conversations(out: Path) -> list[dict]:
    return [c for s in SPLITS for c in read_conversations(out, s)]


def files_cfg(tmp_path, **kw) -> FetchConfig:
    base = dict(source="files", paths=[str(tmp_path / "in")], doc_questions=False,
                synthetic_per_task=0, val_fraction=0.2)
    base.update(kw)
    return FetchConfig(**base)


def test_builtin_documents_are_real_docs():
    docs = list(builtin_documents())
    assert len(docs) > 500
    total = sum(len(d.text.encode()) for d in docs)
    assert total > 1_000_000
    texts = "\n".join(d.text for d in docs[:200])
    assert "assert" in texts and "Help on module" in "\n".join(d.text for d in docs)


def test_synthetic_answers_are_exact():
    convs = list(synthetic_conversations(50, seed=3))
    assert len(convs) == 200
    for c in convs:
        q = [m for r, m in c.messages if r == "user"][-1]
        a = c.answer
        if c.task == "arithmetic":
            expr = q.replace("What is", "").replace("Compute", "").strip(" ?.=")
            assert str(eval(expr)) == a  # noqa: S307 - trusted generated text
        elif c.task == "reverse":
            word = q.split("'")[1]
            assert a == "-".join(word[::-1])  # letter by letter, as spelling answers
        elif c.task == "spell":
            assert a.replace("-", "") == q.split("'")[1]
        elif c.task == "count":
            letter, word = q.split("'")[1], q.split("'")[3]
            assert a == str(word.count(letter))
        assert c.messages[-1][0] == "assistant" and final_answer(c.messages[-1][1]) == a
    assert convs == list(synthetic_conversations(50, seed=3))  # deterministic
    assert any(c.messages[0][0] == "system" for c in convs)
    assert any(sum(r == "assistant" for r, _ in c.messages) == 2 for c in convs)


def test_task_weights_scale_one_task_and_leave_the_others_as_they_were():
    weights = parse_sections({"fetch": {"synthetic_task_weights": {
        "arithmetic": 2.0, "reverse": 0.5}}}, {"fetch": FetchConfig})["fetch"].synthetic_task_weights
    counts = weights.counts(40)
    assert counts == {"arithmetic": 80, "spell": 40, "count": 40, "reverse": 20}
    weighted = list(synthetic_conversations(counts, seed=3, test_per_task=5))
    plain = list(synthetic_conversations(40, seed=3, test_per_task=5))
    by_task = {t: [c for c in weighted if c.task == t and c.split == "train"]
               for t in counts}
    assert {t: len(cs) for t, cs in by_task.items()} == counts
    for task in counts:  # a task's own stream: the shorter draw is the start of the longer
        mine = [c for c in plain if c.task == task and c.split == "train"]
        n = min(len(mine), counts[task])
        assert by_task[task][:n] == mine[:n]
    # the held-out questions do not depend on the weights
    assert [c for c in weighted if c.split == "test"] == [c for c in plain if c.split == "test"]
    with pytest.raises(ConfigError, match="synthetic_task_weights.reverse must be >= 0"):
        parse_sections({"fetch": {"synthetic_task_weights": {"reverse": -1}}}, {"fetch": FetchConfig})


def test_synthetic_held_out_sets_are_fixed_and_disjoint():
    convs = list(synthetic_conversations(300, seed=0, val_per_task=40, test_per_task=30))
    by_split = {s: [c for c in convs if c.split == s] for s in SPLITS}
    assert len(by_split["train"]) == 4 * 300
    assert Counter(c.task for c in by_split["val"]) == dict.fromkeys(TASKS, 40)
    assert Counter(c.task for c in by_split["test"]) == dict.fromkeys(TASKS, 30)
    messages = {s: {c.messages for c in cs} for s, cs in by_split.items()}
    assert not messages["train"] & messages["val"]
    assert not messages["train"] & messages["test"] and not messages["val"] & messages["test"]
    assert len(messages["val"]) == 4 * 40 and len(messages["test"]) == 4 * 30
    # through the corpus: the fixed splits are kept, whatever the hash says
    docs = [Document(f"document number {i}", "test") for i in range(4)]
    # training draws with replacement and keeps its repeats (their number is the weight a
    # task has); a held-out set is distinct questions
    tables, stats = collect(docs + convs, FetchConfig(doc_questions=False))
    assert len(messages["train"]) < len(by_split["train"])  # the draw did repeat
    for s in SPLITS:
        kept = by_split[s] if s == "train" else {c.messages: c for c in by_split[s]}.values()
        assert Counter(r["task"] for r in tables[f"sft_{s}"]) == Counter(
            c.task for c in kept), s
    assert stats.sft_repeats_kept == len(by_split["train"]) - len(messages["train"])
    assert stats.sft_duplicates_dropped == 0
    # a user's conversation repeated is still a duplicate (test_conversations_dedupe_...)


def test_doc_questions_answer_from_docs():
    convs = list(doc_conversations())
    assert len(convs) > 1000
    c = next(c for c in convs if "`json.dumps`" in c.messages[0][1] or "json.dumps(" in c.messages[0][1])
    assert "JSON" in c.answer and c.task == "doc"


def test_split_is_stable_when_documents_are_added():
    texts = [f"document number {i}" for i in range(400)]
    before = {t: split_of(content_key(Document(t, "x")), 0.1, 0.1) for t in texts}
    more = texts + [f"new document {i}" for i in range(100)]
    after = {t: split_of(content_key(Document(t, "x")), 0.1, 0.1) for t in more}
    assert all(after[t] == before[t] for t in texts)
    for held_out in ("val", "test"):
        share = sum(v == held_out for v in before.values()) / len(before)
        assert 0.05 < share < 0.15, held_out


def test_files_source_reads_every_format_and_skips_bad_records(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("A plain text document.")
    (d / "b.md").write_text("# Title\n\nMarkdown body.")
    (d / "bad.txt").write_bytes(b"valid start \xff\xfe broken")
    write_jsonl(d / "c.jsonl", [
        {"text": "JSON line document."},
        b"{not json}\n",
        {"conversations": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]},
        {"messages": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"other": 1},
        {"text": "   "},
        {"text": "JSON line document."},
    ])
    pq.write_table(pa.Table.from_pylist([{"text": "Parquet document one."},
                                         {"text": "Parquet document two."}]), d / "e.parquet")
    cfg = files_cfg(tmp_path)
    out = tmp_path / "corpus"
    stats = build_corpus(cfg, out)
    texts = all_texts(out)
    assert sorted(texts) == sorted(["A plain text document.", "# Title\n\nMarkdown body.",
                                    "JSON line document.", "Parquet document one.",
                                    "Parquet document two."])
    convs = all_conversations(out)
    assert {c["messages"][-1]["content"] for c in convs} == {"hello", "4"}
    assert stats.bad_records == 4 and stats.duplicates_dropped == 1 and stats.empty_dropped == 1
    joined = "\n".join(stats.bad_examples)
    assert f"{d / 'bad.txt'}: invalid UTF-8 at byte 12" in joined
    assert f"{d / 'c.jsonl'}:2: invalid JSON" in joined
    assert f"{d / 'c.jsonl'}:5: message 0 has role 'robot'" in joined
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["tables"][f"pretrain_{s}"]["rows"] for s in SPLITS) == 5
    assert stats.documents == {s: manifest["tables"][f"pretrain_{s}"]["rows"] for s in SPLITS}


def test_strict_mode_fails_naming_file_and_line(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "c.jsonl", [{"text": "fine"}, {"text": "fine too"}, b"{oops\n"])
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: invalid JSON"):
        build_corpus(files_cfg(tmp_path, strict=True), tmp_path / "corpus")


def test_empty_corpus_is_a_clear_error_and_keeps_previous_output(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("good document")
    (d / "b.txt").write_text("another good document")
    out = tmp_path / "corpus"
    build_corpus(files_cfg(tmp_path), out)
    before = (out / "manifest.json").read_text()
    (d / "a.txt").write_text("   \n")
    (d / "b.txt").write_text("")
    with pytest.raises(CorpusError, match="no documents left after cleaning"):
        build_corpus(files_cfg(tmp_path), out)
    assert (out / "manifest.json").read_text() == before


def test_missing_glob_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"'nothing/\*\.txt' matches no file"):
        expand_paths(["nothing/*.txt"], tmp_path)


def test_limits_on_documents_and_bytes():
    recs = [Document(f"doc {i} " + "x" * 100, "t") for i in range(50)]
    _, stats = collect(recs, FetchConfig(max_documents=10, doc_questions=False,
                                         synthetic_per_task=0))
    assert sum(stats.documents.values()) == 10 and stats.limit_dropped == 40
    _, stats = collect(recs, FetchConfig(max_bytes=1000, doc_questions=False,
                                         synthetic_per_task=0))
    assert sum(stats.bytes.values()) <= 1000 and sum(stats.documents.values()) == 9


def test_conversations_dedupe_and_bad_records_counted():
    conv = Conversation((("user", "q"), ("assistant", "a")), "t")
    recs = [Document("text", "t"), Document("more text", "t"), conv, conv,
            BadRecord("f:1", "broken")]
    tables, stats = collect(recs, FetchConfig(doc_questions=False, synthetic_per_task=0))
    assert stats.sft_duplicates_dropped == 1 and stats.bad_records == 1
    assert sum(len(v) for k, v in tables.items() if k.startswith("sft")) == 1


def test_parquet_with_messages_column(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}]),
                   path)
    recs = list(read_file(path, "text"))
    assert recs == [Conversation((("user", "hi"), ("assistant", "yo")), f"file:{path}")]


def test_hf_source_reads_a_local_dataset(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"content": f"hf document {i}"} for i in range(5)])
    cfg = FetchConfig(source="hf", hf_dataset=str(d), text_field="content")
    recs = list(read_hf(cfg))
    assert [r.text for r in recs] == [f"hf document {i}" for i in range(5)]


def test_hf_source_fails_fast_without_the_hub(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    cfg = FetchConfig(source="hf", hf_dataset="someone/some-dataset")
    with pytest.raises(CorpusError, match="cannot reach the Hugging Face hub"):
        list(read_hf(cfg))


def test_stdlib_code_is_training_data_without_docstrings(monkeypatch):
    import json as json_module

    from llmcore.data import pydocs

    src = 'def f():\n    """Doc of f."""\n\n\nclass C:\n    """Doc of C."""\n    x = 1\n'
    assert pydocs._without_docstrings(src) == "def f():\n    ...\n\n\nclass C:\n    x = 1\n"
    # a slice of the standard library with the json package in it (the whole takes seconds)
    files = pydocs._stdlib_files()
    monkeypatch.setattr(pydocs, "_stdlib_files", lambda: [
        f for i, f in enumerate(files) if i < 60 or f[0].split(".")[0] == "json"])
    code = [d for d in pydocs.stdlib_code_documents() if d.group == "module:json"]
    text = "".join(d.text for d in code)
    assert "def dumps(" in text and json_module.__doc__.strip()[:50] not in text
    assert all(d.train_only and d.split is None and d.source.startswith("builtin:code/json")
               for d in code)
    docs = list(pydocs.builtin_documents())
    assert any(d.group == "module:json" for d in docs)
    assert all(not d.train_only for d in docs)
    seen = set()
    for fractions in ((0.1, 0.1), (0.1, 0.49)):  # two cuts: json's docs trained, then tested
        cfg = FetchConfig(doc_questions=False, synthetic_per_task=0, val_fraction=fractions[0],
                          test_fraction=fractions[1])
        without, _ = collect(docs, cfg)
        with_code, stats = collect(docs + code, cfg)
        json_split = {s for s in SPLITS for r in without[f"pretrain_{s}"]
                      if r["source"].startswith("builtin:module/json")}
        assert len(json_split) == 1
        seen |= json_split
        for s in ("val", "test"):  # the same held-out documents, with or without the code
            assert with_code[f"pretrain_{s}"] == without[f"pretrain_{s}"]
        if json_split == {"train"}:
            assert len(with_code["pretrain_train"]) == len(without["pretrain_train"]) + len(code)
            assert stats.held_out_dropped == 0
        else:  # the code of a held-out module would show its names: it is in no split
            assert with_code["pretrain_train"] == without["pretrain_train"]
            assert stats.held_out_dropped == len(code)
    assert seen == {"train", "test"}  # both cases were met


def test_text_utf8_cannot_encode_is_a_malformed_record(tmp_path):
    # JSON's "\ud83d" escape (half of an emoji, as cut scraped text has) parses to a lone
    # surrogate, which neither the tokenizer nor Parquet can take
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "c.jsonl", [
        {"text": "A fine document."},
        {"text": "cut emoji \ud83d here"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "bad \udc80"}]},
        {"text": "Another fine document."},
    ])
    out = tmp_path / "corpus"
    stats = build_corpus(files_cfg(tmp_path), out)
    assert sorted(all_texts(out)) == ["A fine document.", "Another fine document."]
    assert stats.bad_records == 2
    listed = (out / BAD_RECORDS_FILE).read_text().splitlines()
    assert listed == [
        f"{d / 'c.jsonl'}:2: record.text: character 10 (U+D83D) cannot be encoded as UTF-8 "
        "(a lone UTF-16 surrogate); remove or replace it",
        f"{d / 'c.jsonl'}:3: record.messages[1].content: character 4 (U+DC80) cannot be "
        "encoded as UTF-8 (a lone UTF-16 surrogate); remove or replace it"]
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: record\.text: character 10"):
        build_corpus(files_cfg(tmp_path, strict=True), tmp_path / "strict")


def test_expected_answer_is_the_answer_and_a_chat_without_one_is_named():
    conv = {"id": "abc", "messages": [], "task": "spell", "answer": "c-a-t", "source": "s",
            "pool": []}
    assert expected_answer(conv) == "c-a-t"
    with pytest.raises(ValueError, match=r"conversation abc \(chat\) has no answer"):
        expected_answer({**conv, "task": "chat", "answer": None})
