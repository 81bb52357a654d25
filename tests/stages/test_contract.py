"""The split contract, end to end on a tiny project: a planted pool breach stops pack and
evaluate, a test document copied into training stops evaluate, each with one line naming
the set and the example; an untouched corpus passes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from llmcore.data.corpus import PRETRAIN_SCHEMA, SFT_SCHEMA
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.eval.contamination import check_contract
from tests.stages.test_stage_errors import error_line, run


def rows(root, table):
    return pq.read_table(root / f"data/corpus/{table}.parquet").to_pylist()


def write(root, table, new_rows, schema):
    pq.write_table(pa.Table.from_pylist(new_rows, schema=schema),
                   root / f"data/corpus/{table}.parquet")


def test_the_untouched_tiny_corpus_keeps_every_contract(project):
    tok = LLMTokenizer.load(project / "data/tokenizer")
    c = check_contract(tok, project / "data/corpus", project / "data/shards", 250, 4)
    assert c.violation is None, c.violation
    assert c.checks["spell"].overlap.max() < 0.5
    assert "**Every contract holds**" in c.page
    assert c.coverage["words"] > 0


def test_a_pool_breach_stops_evaluate_and_pack(project, monkeypatch, capsys):
    train, test = rows(project, "sft_train"), rows(project, "sft_test")
    leaked = next(r for r in train if r["task"] == "spell")
    moved = dict(leaked, id="f" * 64)  # another conversation about a training word
    write(project, "sft_test", [*test, moved], SFT_SCHEMA)
    code, err = run("evaluate", project, monkeypatch, capsys)
    line = error_line(err)
    assert code == 2 and "pool breach" in line and repr(leaked["pool"][0]) in line
    assert "sft_test" in line and "sft_train" in line
    assert (project / "reports/evaluate/contamination.md").exists()  # the report says why
    assert not (project / "metrics/evaluate.json").exists()  # nothing was scored
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and repr(leaked["pool"][0]) in error_line(err)


def test_a_test_document_copied_into_training_stops_evaluate(project, monkeypatch, capsys):
    copied = rows(project, "pretrain_test")[0]
    train = rows(project, "pretrain_train")
    # the same text under a key of its own: no pool breach, only the copy can be seen
    write(project, "pretrain_train", [*train, dict(copied, id="e" * 64, pool=["doc:planted"])],
          PRETRAIN_SCHEMA)
    assert run("pack", project, monkeypatch, capsys)[0] == 0
    code, err = run("evaluate", project, monkeypatch, capsys)
    line = error_line(err)
    assert code == 2 and "set 'docs_test': example 0" in line
    assert "covering 100% of its runs" in line and "pretrain" in line


def test_the_letters_curriculum_spells_pieces_but_no_held_out_word(packed):
    """Pack mixes conversations spelling vocabulary pieces into the SFT rows; none of them
    spells a val or test word, so a one-token test word stays a word never spelled."""
    import json
    import re

    from llmcore.data.shards import ShardDataset

    tok = LLMTokenizer.load(packed / "data/tokenizer")
    held = {k.split(":", 1)[1] for s in ("val", "test") for r in rows(packed, f"sft_{s}")
            for k in r["pool"] if k.startswith("word:")}
    ds = ShardDataset(packed / "data/shards", "sft_train")
    ids, _ = ds.gather(range(len(ds)))
    text = "".join(tok.decode(row.tolist()) for row in ids)
    spelled = re.findall(r"(?:Which letters make up|Spell) '([a-z]+)'(?:\?|\.)<\|im_end\|>\n"
                         r"<\|im_start\|>assistant\n([a-z-]+)<\|im_end\|>", text)
    assert len(spelled) >= 5 and held  # half of the curriculum spells one piece
    assert all(reply == "-".join(piece) for piece, reply in spelled)
    assert not {piece for piece, _ in spelled} & held
    metrics = json.loads((packed / "metrics/pack.json").read_text())
    assert metrics["pack/letters_conversations"] >= len(spelled) > 0
