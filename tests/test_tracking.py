import pytest

from llmcore.config.model import parse_model
from llmcore.tracking import MlflowTracker, NullTracker, default_uri


def test_null_tracker_records_in_memory():
    t = NullTracker()
    with t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 2.0}, step=3)
    assert t.params == {"a": 1} and t.metrics == [(3, {"loss": 2.0})] and t.status == "FINISHED"
    with pytest.raises(RuntimeError), NullTracker() as failing:
        raise RuntimeError("boom")
    assert failing.status == "FAILED"


def test_mlflow_tracker_writes_runs_to_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = default_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    parent = MlflowTracker(uri, "pipeline", artifact_root=tmp_path / "art")
    child = MlflowTracker(uri, "pack", tags={"llmcore.stage": "pack"},
                          artifact_root=tmp_path / "art", parent_run_id=parent.run_id,
                          flush_every=10_000)
    child.log_params({"pack.seq_len": 64, "pack.note": "x" * 10_000})
    for step in range(25):
        child.log_metrics({"train/loss": 10.0 - step, "bad": float("nan")}, step=step)
    (tmp_path / "note.txt").write_text("hello")
    child.log_artifact(tmp_path / "note.txt", "notes")
    child.finish()
    parent.finish()
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.params["pack.seq_len"] == "64"
    assert run.data.tags["llmcore.stage"] == "pack"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(child.run_id, "train/loss")
    assert [m.step for m in history] == list(range(25)) and history[-1].value == -14.0
    assert "bad" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(child.run_id, "notes")] == ["notes/note.txt"]
    assert (tmp_path / "art").is_dir()


def registry_store(tmp_path):
    """(SQLite store URI, a model directory to register) of a fresh registry."""
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    return default_uri(tmp_path), model_dir


def test_best_moves_only_for_a_drop_beyond_the_margin(tmp_path):
    from mlflow.tracking import MlflowClient

    from llmcore.tracking import PROMOTE_MARGIN, register_model

    uri, model_dir = registry_store(tmp_path)
    client = MlflowClient(uri)
    seen = []
    # first; better by far; better, but inside the margin; worse; no bpb; better by enough
    for bpb in (2.0, 1.5, 1.5 - PROMOTE_MARGIN / 2, 1.8, None, 1.5 - 2 * PROMOTE_MARGIN):
        t = MlflowTracker(uri, "sft", artifact_root=tmp_path / "art")
        reg = register_model(t, model_dir, bpb, "sft")
        t.finish()
        best = str(client.get_model_version_by_alias("llmcore", "best").version)
        seen.append((reg.alias, best))
        if reg.alias == "challenger":
            tags = client.get_model_version("llmcore", reg.version).tags
            assert tags["best_version"] == best and tags["promotion"].startswith("challenger")
            assert str(client.get_model_version_by_alias("llmcore", "challenger").version) \
                == reg.version
            assert "best moves only for a drop of more than" in reg.message
    assert seen == [("best", "1"), ("best", "2"), ("challenger", "2"), ("challenger", "2"),
                    ("challenger", "2"), ("best", "6")]
    tags = client.get_model_version("llmcore", "6").tags
    assert tags["best_version"] == "2" and float(tags["val_bpb_delta"]) < -PROMOTE_MARGIN
    assert register_model(NullTracker(), model_dir, 1.0, "sft") is None


def test_best_compares_val_bpb_only_within_one_split_version(tmp_path):
    from mlflow.tracking import MlflowClient

    from llmcore.tracking import PROMOTE_MARGIN, SPLIT_VERSION, register_model

    assert isinstance(SPLIT_VERSION, str)
    uri, model_dir = registry_store(tmp_path)
    client = MlflowClient(uri)

    def register(bpb, **kwargs):
        t = MlflowTracker(uri, "sft", artifact_root=tmp_path / "art")
        reg = register_model(t, model_dir, bpb, "sft", **kwargs)
        t.finish()
        best = str(client.get_model_version_by_alias("llmcore", "best").version)
        return reg, best, client.get_model_version("llmcore", reg.version).tags

    # v1: best on split version 2
    reg, best, tags = register(1.2, split_version="2")
    assert (reg.alias, best, tags["split_version"]) == ("best", "1", "2")
    # v2: far worse, but measured on split version 3: not compared with v1, takes best
    reg, best, tags = register(2.0, split_version="3")
    assert (reg.alias, best, tags["split_version"]) == ("best", "2", "3")
    assert tags["promotion"] == ("best: the first version on split version 3 "
                                 "(version 1 held best on split version 2)")
    assert "best_version" not in tags and "val_bpb_delta" not in tags  # nothing was compared
    assert "version 1 held best on split version 2" in reg.message
    # v3, v4: on split version 3 again, the margin rule holds against v2
    reg, best, tags = register(2.0 - PROMOTE_MARGIN / 2, split_version="3")
    assert (reg.alias, best) == ("challenger", "2")
    assert tags["best_version"] == "2" and tags["split_version"] == "3"
    assert tags["promotion"].startswith("challenger") and "split version 3" in tags["promotion"]
    reg, best, tags = register(2.0 - 2 * PROMOTE_MARGIN, split_version="3")
    assert (reg.alias, best) == ("best", "4")
    assert tags["best_version"] == "2" and float(tags["val_bpb_delta"]) < -PROMOTE_MARGIN
    # v5: an old-split version better by far never takes best from a split-3 holder by
    # comparison; it takes best only as the first of its split version (and says so)
    reg, best, tags = register(0.5, split_version="2")
    assert (reg.alias, best) == ("best", "5")
    assert tags["promotion"] == ("best: the first version on split version 2 "
                                 "(version 4 held best on split version 3)")
    # the default is SPLIT_VERSION, and a tag of that name cannot override the argument
    reg, best, tags = register(0.1, tags={"split_version": "2"})
    assert (reg.alias, best, tags["split_version"]) == ("best", "6", SPLIT_VERSION)


def test_a_best_holder_without_a_split_version_is_not_compared(tmp_path):
    """A version registered before split versions were tagged holds best on no known split."""
    from mlflow.tracking import MlflowClient

    from llmcore.tracking import SPLIT_VERSION, register_model

    uri, model_dir = registry_store(tmp_path)
    client = MlflowClient(uri)
    t = MlflowTracker(uri, "sft", artifact_root=tmp_path / "art")
    register_model(t, model_dir, 1.0, "sft")
    client.delete_model_version_tag("llmcore", "1", "split_version")  # as an old version
    reg = register_model(t, model_dir, 3.0, "sft")
    t.finish()
    assert reg.alias == "best"
    assert str(client.get_model_version_by_alias("llmcore", "best").version) == "2"
    assert client.get_model_version("llmcore", "2").tags["promotion"] == (
        f"best: the first version on split version {SPLIT_VERSION} "
        "(version 1 held best on no recorded split version)")


def test_system_metrics_are_sampled_into_the_run(tmp_path):
    import time

    from mlflow.tracking import MlflowClient

    uri = default_uri(tmp_path)
    t = MlflowTracker(uri, "pretrain", artifact_root=tmp_path / "art")
    t.start_system_metrics(interval=0.5)
    time.sleep(2.0)
    t.finish()
    metrics = MlflowClient(uri).get_run(t.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def test_registry_models_load_and_predict_as_mlflow_pyfunc(tmp_path, tiny_tokenizer):
    """The registered model is a real MLflow model: pyfunc load + predict from the alias, and
    ``mlflow models predict`` on the command line, giving llmcore's own greedy replies."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlflow
    import pandas as pd
    import torch
    from mlflow.tracking import MlflowClient

    from llmcore.data.tokenizer import render_chat
    from llmcore.infer.generate import Sampling, generate
    from llmcore.model.modeldir import save_model_dir, state_dict_for_save
    from llmcore.model.transformer import Transformer
    from llmcore.tracking import register_model

    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": tiny_tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {"eos_token_id": [2, 0], "pad_token_id": 3})
    uri = default_uri(tmp_path)
    t = MlflowTracker(uri, "sft", artifact_root=tmp_path / "art")
    version = register_model(t, tmp_path / "m", 1.0, "sft",
                             tags={"git_commit": "abc123", "dvc.data/shards": "0f0f"}).version
    t.finish()
    tags = MlflowClient(uri).get_model_version("llmcore", version).tags
    assert tags["git_commit"] == "abc123" and tags["dvc.data/shards"] == "0f0f"

    prompts = ["What is 12 + 7?", "Spell the word 'list'."]
    ids = [tiny_tokenizer.encode(render_chat([{"role": "user", "content": p}], True))
           for p in prompts]
    expected = [tiny_tokenizer.decode(o, skip_special_tokens=True) for o in generate(
        model, ids, Sampling(max_new_tokens=8), [2, 0], pad_id=3)]

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/llmcore@best")
    from llmcore.export.pyfunc import DEFAULT_PARAMS

    params = loaded.metadata.get_params_schema().params
    assert {p.name: p.default for p in params} == DEFAULT_PARAMS
    import re

    import pytest

    got = loaded.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 8})
    assert list(got["completion"]) == expected
    chat = loaded.predict([{"messages": [{"role": "user", "content": prompts[0]}]}],
                          params={"max_new_tokens": 8})
    assert list(chat["completion"]) == expected[:1]

    # every accepted shape answers one completion per prompt, the same as the DataFrame
    conv = [{"role": "user", "content": prompts[0]}]
    conv2 = [{"role": "user", "content": prompts[1]}]
    for shape, want in [
            (prompts[0], expected[:1]), (prompts, expected), (conv, expected[:1]),
            ([conv, conv2], expected), ({"prompt": prompts}, expected),
            ({"prompt": prompts[1]}, expected[1:]), ({"messages": [conv, conv2]}, expected),
            ({"messages": conv}, expected[:1]), ([{"prompt": p} for p in prompts], expected),
            (pd.DataFrame({"messages": [conv, conv2]}), expected)]:
        got = loaded.predict(shape, params={"max_new_tokens": 8})
        assert list(got["completion"]) == want, shape
    for bad, why in [(42, "the input is a int"), ([prompts[0], 7], "input[1] is neither"),
                     ({"text": ["x"]}, "needs one key"), ({"prompt": [["x"]]}, "prompt[0]"),
                     ("cut \ud800", "prompt 0: character 4 (U+D800) cannot be encoded"),
                     ([conv, [{"role": "user", "content": "\udc80"}]],
                      "prompt 1 messages[0].content: character 0 (U+DC80)")]:
        with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(why)) as info:
            loaded.predict(bad, params={"max_new_tokens": 8})
        assert "U+D" in why or "a list of strings" in str(info.value)  # the shapes, named

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    def cli(body):
        (tmp_path / "in.json").write_text(json.dumps({**body, "params": {"max_new_tokens": 8}}))
        out = subprocess.run(
            [str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m",
             "models:/llmcore@best", "-i", str(tmp_path / "in.json"), "-t", "json",
             "--env-manager", "local"], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [p["completion"] for p in json.loads(out.stdout.strip().splitlines()[-1])[
            "predictions"]]

    assert cli({"inputs": prompts}) == expected  # numpy arrays on the way in
    assert cli({"inputs": {"messages": [conv, conv2]}}) == expected


def test_serve_a_registry_uri(tmp_path, tiny_tokenizer):
    """`llmcore serve models:/<name>@best` downloads the version and serves it by that name."""
    import os

    import httpx
    import torch

    from llmcore.infer.generate import Sampling, generate
    from llmcore.model.modeldir import save_model_dir, state_dict_for_save
    from llmcore.model.transformer import Transformer
    from llmcore.tracking import register_model
    from tests.conftest import project_env
    from tests.serve.live_server import LiveServer

    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": tiny_tokenizer.vocab_size})
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {}, {})
    uri = default_uri(tmp_path)
    t = MlflowTracker(uri, "sft", artifact_root=tmp_path / "art")
    version = register_model(t, tmp_path / "m", 1.0, "sft").version
    t.finish()
    env = {**project_env(), "MLFLOW_TRACKING_URI": uri, "HOME": str(tmp_path / "home")}
    srv = LiveServer("models:/llmcore@best", env=env)
    try:
        assert srv.health()["model"] == f"llmcore:{version}"
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
        ids = tiny_tokenizer.encode_prompt([{"role": "user", "content": "hi"}])
        out = generate(model, [ids], Sampling(max_new_tokens=5),
                       [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id])[0]
        assert r.json()["choices"][0]["message"]["content"] == tiny_tokenizer.decode(out)
    finally:
        srv.stop()
    assert os.listdir(tmp_path / "home" / ".cache" / "llmcore" / "registry")
    bad = subprocess_run_serve("models:/nothing@best", env)
    assert bad.returncode == 2 and "not in the registry" in bad.stderr


def subprocess_run_serve(model: str, env: dict):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmcore.cli", "serve", model, "--port", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
