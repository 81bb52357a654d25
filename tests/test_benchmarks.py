"""Benchmarks are scripts, not tests; this only checks that each still imports (an API it
uses that moved or was renamed fails here, not the next time someone measures)."""

import importlib.util
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARKS = sorted(BENCH_DIR.glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)


def _run(args: list[str], timeout: float = 600):
    import sys

    from tests.conftest import project_env, run_group

    env = project_env()
    env["OMP_NUM_THREADS"] = "1"
    done = run_group([sys.executable, *args], timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_gpu_check_says_why_and_exits_0_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run for real")
    done = _run([str(BENCH_DIR / "gpu_check.py")], 120)
    assert "no CUDA device here" in done.stdout


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """The GPU check's code paths (bf16 autocast, SDPA held to the flash kernel, Muon, the
    engine's decode, DDP and FSDP through fit under torchrun) at toy sizes on the CPU, so the
    script is known to run before a GPU is there."""
    import json

    _run([str(BENCH_DIR / "gpu_check.py"), "--smoke-cpu",
          "--out", str(tmp_path / "gpu.json")])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["smoke"] is True
    assert [t["preset"] for t in report["train"]] == ["gpt2-mini", "llama-0.5b"]
    for t in report["train"]:
        assert "error" not in t, t
        assert t["flash"] and t["tokens_per_s"] > 0 and t["loss_last"] < t["loss_first"]
    assert report["decode"]["batch_1_tokens_per_s"] > 0
    assert report["decode"]["batch_32_tokens_per_s"] > 0
    d = report["distributed"]
    assert d["ddp"]["returncode"] == 0 and d["fsdp"]["returncode"] == 0
    assert d["max_rel_loss_difference"] < 1e-5


@pytest.mark.slow
def test_fsdp_memory_computed_equals_what_each_rank_holds(tmp_path):
    """The per-rank table is computed from shapes; at world size 2 every rank's local
    tensors (params, grads, optimizer state) must add up to exactly that."""
    import json

    out = tmp_path / "mem.json"
    _run([str(BENCH_DIR / "fsdp_memory.py"), "--measure-layers", "2",
          "--measure-d-model", "128", "--vocab", "500", "--worlds", "2", "--report", str(out),
          "--strategies", "fsdp"])  # ddp's measurement is every tensor whole: nothing to cut
    report = json.loads(out.read_text())
    (fsdp,) = report["measured"]
    for rank in fsdp["ranks"]:
        for part in ("params", "grads", "optimizer"):
            if rank["rank"] == 1:
                assert 0 < rank[part] <= fsdp["computed"][part]  # rank 0: the larger chunks
            else:
                assert rank[part] == fsdp["computed"][part], (rank, part)
    rows = report["computed"]["rows"]
    ddp_total = next(r["total"] for r in rows if r["parallel"] == "ddp" and r["opt"] == "muon")
    fsdp_total = next(r["total"] for r in rows if r["parallel"] == "fsdp" and r["opt"] == "muon")
    assert fsdp_total < 0.55 * ddp_total
    assert {(r["parallel"], r["opt"]) for r in rows} == {
        (p, o) for p in ("ddp", "fsdp") for o in ("muon", "adamw")}


def test_chain_gain_pairs_the_models_of_each_seeds_run():
    """Each seed's run scored SFT, DPO and RL on the same questions: a step's gain is the paired
    difference, found from `dvc exp show --json` by the experiments' names."""
    from benchmarks.chain_gain import chain_gain, runs_of

    def rev(name: str, sft: float, rl: float) -> dict:
        data = {"evaluate/sft/arithmetic_exact_match": sft, "evaluate/dpo/arithmetic_exact_match":
                sft, "evaluate/rl/arithmetic_exact_match": rl}
        return {"name": name, "revs": [{"name": name, "data": {"metrics": {
            "metrics/evaluate.json": {"data": data}}}}]}

    show = [{"experiments": [rev("d-base-s1", 0.40, 0.45), rev("d-base-s2", 0.50, 0.551),
                             rev("d-base-s3", 0.60, 0.649), rev("d-other-s1", 0.0, 1.0),
                             rev("dd-base-s4", 0.0, 1.0)]}]
    runs = runs_of("d", "base", show)
    assert sorted(runs) == [1, 2, 3]  # neither another side nor another comparison
    gain = chain_gain(runs)
    rl = gain["sft->rl"]["arithmetic_exact_match"]
    assert rl["seeds"] == [1, 2, 3] and abs(rl["diff"] - 0.05) < 1e-9
    assert rl["p"] < 0.01 and rl["verdict"] == "better"
    assert gain["sft->dpo"]["arithmetic_exact_match"]["diff"] == 0.0
    assert gain["sft->rl"]["count_exact_match"]["diff"] is None  # not scored: no figure


def test_task_recipe_weights_start_from_the_pipeline_default_and_are_checked():
    """The probe's ``--task-weights`` overrides the pipeline's own weights (so a probe of the
    default is the default), and a bad weight is refused as params.yaml would refuse it."""
    from llmcore.config.fetch import FetchConfig

    path = BENCH_DIR / "task_recipe.py"
    spec = importlib.util.spec_from_file_location("bench_task_recipe_w", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.task_weights("") == FetchConfig().synthetic_task_weights
    assert module.task_weights("reverse=0.5").counts(10)["reverse"] == 5
    for bad, says in (("reverse=-1", "must be >= 0"), ("arith=2", "TASK=WEIGHT"),
                      ("spell=x", "TASK=WEIGHT")):
        with pytest.raises(SystemExit, match=says):
            module.task_weights(bad)


def test_decode_speed_builds_a_random_model_of_a_shape_and_pairs_rounds(tmp_path,
                                                                        tiny_tokenizer):
    """``--shape LxD`` gives a loadable model directory of that shape (heads of 64), and a
    ratio is taken round by round, with its interval."""
    import sys

    import torch

    sys.path.insert(0, str(BENCH_DIR))
    import decode_speed

    from llmcore.model.modeldir import load_model_dir

    tiny_tokenizer.save(tmp_path / "tok")
    path = decode_speed.random_model_dir(tmp_path / "m", "tiny", "3x128", tmp_path / "tok")
    model, cfg = load_model_dir(path, torch.device("cpu"))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == (
        3, 128, 2, tiny_tokenizer.vocab_size)
    for bad in ("8x", "8x100", "x512"):  # a shape it cannot build: one line naming the fix
        with pytest.raises(SystemExit, match="give LxD"):
            decode_speed.random_model_dir(tmp_path / "bad", "tiny", bad, tmp_path / "tok")
    with pytest.raises(SystemExit, match="--preset 'nope'"):
        decode_speed.random_model_dir(tmp_path / "bad", "nope", None, tmp_path / "tok")
    r = decode_speed._ratios({"llmcore int8": [2.0, 4.0, 3.0], "engine": [1.0, 2.0, 1.0],
                              "generate": [1.0, 1.0, 1.0]})
    assert list(r) == ["llmcore int8 / engine"]
    assert r["llmcore int8 / engine"]["mean"] == 7 / 3 and r["llmcore int8 / engine"]["n"] == 3
    lo, hi = r["llmcore int8 / engine"]["ci95"]
    assert lo < 7 / 3 < hi
