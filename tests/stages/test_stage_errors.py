"""Every user mistake a stage meets is one line naming the file or key, exit status 2.

The stages run in-process in a small project folder (tracking off); one test runs a stage as
DVC does, in its own process, to show that the user sees no traceback.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, project_env

TINY = {
    "base": {"tracking": "none"},
    "fetch": {"max_documents": 60, "synthetic_per_task": 20, "doc_questions": False},
    "tokenizer": {"vocab_size": 300},
    "pack": {"seq_len": 32, "rows_per_shard": 64},
    "model": {"preset": "tiny"},
    "pretrain": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                 "eval_batches": 1, "checkpoint_every": 2, "log_every": 2, "peak_flops": 1e12, "compile": False},
    "sft": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
            "eval_batches": 1, "checkpoint_every": 2, "log_every": 2, "peak_flops": 1e12, "compile": False},
    "dpo": {"max_steps": 0},
    "rl": {"max_steps": 0},
}


def write_params(root: Path, updates: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in updates.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the pipeline the stages run in: they read the chain of models from it
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())


def run(stage: str, root: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run ``stages.<stage>`` in ``root``; (exit status, what it printed to stderr)."""
    monkeypatch.chdir(root)
    module = importlib.import_module(f"stages.{stage}")
    code = 0
    try:
        module.main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_section_is_an_error_when_a_stage_runs_alone(project, monkeypatch, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pakc"] = {"seq_len": 64}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and "unknown section 'pakc' (did you mean pack?" in err


def test_a_stage_reads_the_params_dvc_yaml_lists_for_it(project, monkeypatch, capsys):
    """The params a stage may read are its ``params:`` in dvc.yaml: a section it does not
    read, a section it reads left out, or a key it reads left out each end the stage with one
    line naming dvc.yaml (and nothing written)."""
    graph = yaml.safe_load((project / "dvc.yaml").read_text())

    def with_params(stage, listed):
        changed = yaml.safe_load(yaml.safe_dump(graph))
        changed["stages"][stage]["params"] = listed
        (project / "dvc.yaml").write_text(yaml.safe_dump(changed))

    with_params("pack", ["pack", "sft"])
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and "stage 'pack' lists params of sft, which it does not read" in err
    with_params("pack", [])
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and "stage 'pack' reads the params of pack, which its params there do " \
                         "not list" in err
    with_params("pretrain", ["base.seed", "base.device", "model", "pretrain"])  # no base.dtype
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2 and "reads base.dtype but does not declare it: add it to the stage's " \
                         "params in dvc.yaml" in err
    assert not (project / "metrics/pretrain.json").exists()


def test_exponent_without_a_dot_gets_the_yaml_hint(project, monkeypatch, capsys):
    text = (project / "params.yaml").read_text().replace("lr: 0.015", "lr: 15e-3")
    (project / "params.yaml").write_text(text)
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2
    assert "pretrain.lr must be a number (got '15e-3'); YAML reads 15e-3 as a string: write it " \
           "with a dot, e.g. 1.0e-3" in err


def test_missing_and_garbage_tokenizer(project, monkeypatch, capsys):
    (project / "data/tokenizer/tokenizer.json").write_text("{ not a tokenizer")
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and "data/tokenizer/tokenizer.json is not a valid tokenizer" in \
        error_line(err) and "run `dvc repro tokenizer`" in err
    shutil.rmtree(project / "data/tokenizer")
    code, err = run("pack", project, monkeypatch, capsys)
    assert code == 2 and "tokenizer.json not found: run `dvc repro tokenizer`" in error_line(err)


def test_bad_shard_directory(project, monkeypatch, capsys):
    (project / "data/shards/manifest.json").unlink()
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2
    assert "data/shards/manifest.json not found" in error_line(err) and "dvc repro pack" in err


def test_missing_shard_file(project, monkeypatch, capsys):
    next((project / "data/shards").glob("pretrain_train-*.arrow")).unlink()
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2 and "is missing or unreadable" in error_line(err)


def test_wrong_model_directory(project, monkeypatch, capsys):
    code, err = run("sft", project, monkeypatch, capsys)  # pretrain never ran
    assert code == 2
    assert "data/models/pretrain is not a model directory (no config.json)" in error_line(err)


def test_corrupt_checkpoint_with_resume_must(project, monkeypatch, capsys):
    assert run("pretrain", project, monkeypatch, capsys)[0] == 0
    for weights in (project / "data/checkpoints/pretrain").glob("*/step-*/model.safetensors"):
        weights.write_bytes(b"corrupt")
    write_params(project, {**TINY, "pretrain": {**TINY["pretrain"], "resume": "must"}})
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2
    assert "does not match its checksum" in err  # each skipped checkpoint is named
    assert "pretrain.resume is must but" in error_line(err)
    assert "set pretrain.resume: auto to start fresh" in err


def test_empty_validation_split_is_an_explicit_choice(project, monkeypatch, capsys):
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    for shard in manifest["splits"]["pretrain_val"]["shards"]:
        (project / "data/shards" / shard["file"]).unlink()
    manifest["splits"]["pretrain_val"].update(shards=[], rows=0)
    (project / "data/shards/manifest.json").write_text(json.dumps(manifest))
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 2
    assert "split 'pretrain_val' has no rows" in error_line(err)
    assert "set pretrain.require_val: false" in err
    write_params(project, {**TINY, "pretrain": {**TINY["pretrain"], "require_val": False}})
    code, err = run("pretrain", project, monkeypatch, capsys)
    assert code == 0, err
    assert "training without validation" in err
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert metrics["pretrain/val_rows"] == 0 and metrics["pretrain/val_bpb"] is None
    assert metrics["pretrain/export_step"] == 4  # the last weights, as said


def test_interrupted_stages_leave_nothing_behind(project, monkeypatch, capsys):
    """What a kill -9 leaves (temporaries of fetch, pack, checkpoints) the next run removes."""
    leftovers = [project / "data/.corpus.tmp-abc123", project / "data/.shards.tmp-def456",
                 project / "data/.corpus.old-999"]
    for d in leftovers:
        d.mkdir()
        (d / "partial.arrow").write_bytes(b"\0" * 1000)
    assert run("fetch", project, monkeypatch, capsys)[0] == 0
    assert run("pack", project, monkeypatch, capsys)[0] == 0
    assert not any(d.exists() for d in leftovers)
    assert run("pretrain", project, monkeypatch, capsys)[0] == 0
    (config_dir,) = (project / "data/checkpoints/pretrain").iterdir()
    stale = config_dir / ".step-00000006.tmp-xyz"
    stale.mkdir()
    write_params(project, {**TINY, "pretrain": {**TINY["pretrain"], "max_steps": 6}})
    assert run("pretrain", project, monkeypatch, capsys)[0] == 0
    assert not stale.exists()
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "data/.corpus.tmp-abc",
                              "data/.shards.tmp-1", "data/checkpoints/pretrain/x",
                              "data/models/chat-int8"], cwd=REPO, capture_output=True, text=True)
    assert len(ignored.stdout.split()) == 4, ignored.stdout


def test_malformed_records_are_counted_and_capped(project, monkeypatch, capsys):
    notes = project / "notes"
    notes.mkdir()
    (notes / "good.jsonl").write_text("".join(json.dumps({"text": f"note {i}"}) + "\n"
                                              for i in range(30)))
    (notes / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n" * 774)
    write_params(project, {**TINY, "fetch": {"source": "files", "paths": ["notes"],
                                             "doc_questions": False, "synthetic_per_task": 0}})
    code, err = run("fetch", project, monkeypatch, capsys)
    assert code == 0, err
    skipped = [ln for ln in err.splitlines() if "malformed record skipped" in ln]
    assert len(skipped) == 5
    assert "... and 769 more malformed records, all listed in data/corpus/bad_records.txt" in err
    listed = (project / "data/corpus/bad_records.txt").read_text().splitlines()
    assert len(listed) == 774 and listed[-1].startswith(str(notes / "binary.jsonl") + ":774:")
    metrics = json.loads((project / "metrics/fetch.json").read_text())
    assert metrics["fetch/bad_records"] == 774
    assert metrics["fetch/documents_val"] >= 1 and metrics["fetch/documents_train"] >= 1


def test_a_stage_process_prints_no_traceback(project):
    (project / "data/tokenizer/tokenizer.json").write_text("garbage")
    out = subprocess.run([sys.executable, "-m", "stages.pack"], cwd=project,
                         env={**project_env(), "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "pack: error: ") and "tokenizer.json is not a valid tokenizer" in out.stderr


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_quantize_writes_gguf_only_where_llama_cpp_can_run_it(project, monkeypatch, capsys,
                                                              positions):
    """The default quantize.gguf never fails an experiment whose model is not Llama-shaped."""
    write_params(project, {**TINY, "model": {"preset": "tiny", "positions": positions}})
    for stage in ("pretrain", "sft", "dpo", "rl", "quantize"):
        code, err = run(stage, project, monkeypatch, capsys)
        assert code == 0, err
    gguf = project / "data/models/chat-int8/model.gguf"
    assert (project / "data/models/chat-int8/model.safetensors").is_file()
    if positions == "rope":
        assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    else:
        assert not gguf.exists()
        assert "no GGUF written" in err and "positions is learned" in err


def test_rl_on_compounds_asks_about_compounds_not_training_words(project, monkeypatch, capsys):
    write_params(project, {**TINY, "rl": {"max_steps": 2, "prompts_per_step": 2,
                                          "group_size": 2, "max_new_tokens": 6,
                                          "eval_per_task": 2, "tasks": ["spell", "reverse"],
                                          "words": "compounds"}})
    for stage in ("pretrain", "sft", "dpo", "rl"):
        code, err = run(stage, project, monkeypatch, capsys)
        assert code == 0, (stage, err)
    asked = re.search(r"compounds of vocabulary pieces \((\d+) questions in place of (\d+)", err)
    assert asked and int(asked[1]) > 0 and int(asked[2]) > 0, err
    assert json.loads((project / "metrics/rl.json").read_text())["rl/steps"] == 2
    # a vocabulary that makes no compound: one line that names the way out, no model written
    import stages.rl

    shutil.rmtree(project / "data/models/rl")
    monkeypatch.setattr(stages.rl, "compound_task_rows", lambda *a, **k: [])
    code, err = run("rl", project, monkeypatch, capsys)
    assert code == 2 and "set rl.words: train" in error_line(err), err
    assert not (project / "data/models/rl").exists()


def test_dpo_trains_on_pairs_from_a_minimind_file_and_refuses_no_pairs(project, monkeypatch,
                                                                      capsys):
    pairs = project / "dpo.jsonl"
    rows = [{"chosen": [{"role": "user", "content": f"Is {i} even?"},
                        {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
             "rejected": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]}
            for i in range(40)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    small = {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 3,
             "max_new_tokens": 4}
    write_params(project, {**TINY, "fetch": {**TINY["fetch"], "preference_paths": ["dpo.jsonl"]},
                           "dpo": {**small, "pairs_per_task": 0, "val_pairs_per_task": 0}})
    for stage in ("fetch", "tokenizer", "pack", "pretrain", "sft", "dpo"):
        code, err = run(stage, project, monkeypatch, capsys)
        assert code == 0, (stage, err)
    fetched = json.loads((project / "metrics/fetch.json").read_text())
    assert fetched["fetch/preference_pairs"] == 40 and fetched["fetch/bad_records"] == 1
    m = json.loads((project / "metrics/dpo.json").read_text())
    assert m["dpo/train_pairs"] == fetched["fetch/preference_pairs_train"]
    assert m["dpo/on_policy_rejected"] == 0 and m["dpo/val_reward_accuracy"] is not None
    write_params(project, {**TINY, "dpo": {**small, "pairs_per_task": 0,
                                           "corpus_pairs": False}})
    code, err = run("dpo", project, monkeypatch, capsys)
    assert code == 2 and "no preference pairs" in err and "Traceback" not in err


def test_a_tracking_server_that_is_down_fails_the_stage_in_one_line(project, monkeypatch,
                                                                    capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    write_params(project, {**TINY, "base": {"tracking": "mlflow"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    before = sorted(p.name for p in (project / "data").rglob("*"))
    code, err = run("tokenizer", project, monkeypatch, capsys)
    assert code == 1  # not the user's error: a flow may retry it
    line = error_line(err)
    assert "cannot be reached" in line and f"127.0.0.1:{port}" in line
    assert "Traceback" not in err
    assert sorted(p.name for p in (project / "data").rglob("*")) == before
