"""Seeds and significance: intervals and Welch's test against textbook values, verdicts in the
right direction, the run plan of a comparison, and the report's plot."""

import json
import math

import pytest

from llmcore.report.compare import (
    compare,
    describe,
    lower_is_better,
    markdown,
    paired,
    plot,
    welch,
)
from pipeline.compare import final_model, parse, plan, side_name


def test_describe_gives_the_t_interval_of_the_mean():
    d = describe([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445: half width 2.776445 * 1.581139 / sqrt(5)
    assert d["mean"] == 3.0 and d["sd"] == pytest.approx(math.sqrt(2.5))
    assert d["ci95"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-5)
    assert describe([2.0])["ci95"] == [None, None]  # one seed has no spread
    assert describe([None, float("nan")])["n"] == 0


def test_welch_matches_the_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    w = welch(a, b)
    # variances of the means 0.5 and 2.0: se sqrt(2.5); Welch-Satterthwaite df
    # 2.5^2 / (0.5^2/4 + 2^2/4) = 5.882; t = 3 / 1.5811 = 1.897, two-sided p = 0.1075
    assert w["diff"] == 3.0 and w["df"] == pytest.approx(5.882, abs=1e-3)
    assert w["p"] == pytest.approx(0.1075, abs=5e-4)
    half = w["ci95"][1] - 3.0
    # t(0.975, 5.882) = 2.459 (between 2.571 at df 5 and 2.447 at df 6, linear in 1/df)
    assert half == pytest.approx(2.459 * math.sqrt(2.5), rel=1e-3)
    assert welch([1.0, 1.0], [1.0, 1.0])["p"] is None  # no spread at all: undefined
    assert welch([1.0], [2.0, 3.0])["p"] is None


def test_the_paired_test_takes_the_differences_seed_by_seed():
    # a constant gain of 0.1 on top of a spread of 0.4 between seeds: Welch cannot see it,
    # the seed-by-seed differences (0.1, 0.1, 0.1, 0.12, 0.08) can
    base = {1: 0.1, 2: 0.3, 3: 0.5, 4: 0.2, 5: 0.4}
    variant = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.32, 5: 0.48}
    p = paired(base, variant)
    # mean 0.1, sd sqrt(0.0008/4) = 0.014142: t = 0.1 / (0.014142 / sqrt 5) = 15.81, df 4
    assert p["diff"] == pytest.approx(0.1) and p["seeds"] == [1, 2, 3, 4, 5]
    assert p["p"] == pytest.approx(9.3e-5, rel=0.05)
    assert welch(list(base.values()), list(variant.values()))["p"] > 0.3
    assert paired({1: 0.1, 2: None}, {1: 0.2, 2: 0.3})["p"] is None  # one common seed only
    # the same move at every seed (in floats, 0.208 - 0.192 and 0.236 - 0.22 differ in the
    # last bits): no t-test, rather than p = 0 out of rounding
    same = paired({1: 0.208, 2: 0.236, 3: 0.3}, {1: 0.192, 2: 0.22, 3: 0.284})
    assert same["diff"] == pytest.approx(-0.016) and same["p"] is None
    r = compare({"base": {s: {"a": v} for s, v in base.items()},
                 "v": {s: {"a": v} for s, v in variant.items()}}, "base", ["a"])
    assert r["metrics"]["a"]["against_baseline"]["v"]["paired"]["verdict"] == "better"
    assert r["metrics"]["a"]["against_baseline"]["v"]["verdict"] == "no detectable difference"


def test_a_run_reports_its_last_scored_model_as_the_final_one():
    quick = {"evaluate/pretrain/docs_bpb": 2.0, "evaluate/sft/docs_bpb": 2.1,
             "evaluate/sft/count_exact_match": 0.4}
    full = {**quick, "evaluate/rl/docs_bpb": 2.2, "evaluate/rl/count_exact_match": 0.6}
    assert final_model(quick) == {"evaluate/final/docs_bpb": 2.1,
                                  "evaluate/final/count_exact_match": 0.4}
    assert final_model(full)["evaluate/final/count_exact_match"] == 0.6
    assert final_model({"sft/val_bpb": 1.0}) == {}


def test_verdicts_follow_the_direction_of_each_metric():
    base = {s: {"evaluate/sft/val_bpb": 1.50 + 0.001 * s, "evaluate/sft/count_exact_match":
                0.50 + 0.01 * s} for s in range(1, 6)}
    better = {s: {"evaluate/sft/val_bpb": 1.40 + 0.001 * s, "evaluate/sft/count_exact_match":
                  0.30 + 0.01 * s} for s in range(1, 6)}
    same = {s: dict(base[6 - s]) for s in range(1, 6)}  # the same values, other seeds
    r = compare({"base": base, "lower": better, "same": same}, "base",
                ["evaluate/sft/val_bpb", "evaluate/sft/count_exact_match"])
    bpb = r["metrics"]["evaluate/sft/val_bpb"]["against_baseline"]
    count = r["metrics"]["evaluate/sft/count_exact_match"]["against_baseline"]
    assert bpb["lower"]["verdict"] == "better" and count["lower"]["verdict"] == "worse"
    assert bpb["lower"]["p"] < 1e-6 and bpb["lower"]["ci95"][1] < 0
    assert bpb["same"]["verdict"] == "no detectable difference" and bpb["same"]["p"] == pytest.approx(1.0)
    assert lower_is_better("evaluate/sft/sft_val_bpb") and not lower_is_better("a/doc_mc_accuracy")
    # one seed on a side (a comparison stopped early): nothing to test, and it says so
    one = compare({"base": base, "early": {1: better[1]}}, "base", ["evaluate/sft/val_bpb"])
    early = one["metrics"]["evaluate/sft/val_bpb"]["against_baseline"]["early"]
    assert early["verdict"] == "too few seeds" and early["paired"]["verdict"] == "too few seeds"
    table = markdown(r)
    assert "| evaluate/sft/val_bpb | lower | 5 |" in table and "| better |" in table


def test_the_plot_has_a_panel_per_metric(tmp_path):
    base = {s: {"m/val_bpb": 1.0 + s / 10, "m/acc": s / 10} for s in range(1, 4)}
    other = {s: {"m/val_bpb": 0.9 + s / 10, "m/acc": s / 20} for s in range(1, 4)}
    path = plot(compare({"base": base, "v": other}, "base", ["m/val_bpb", "m/acc"]),
                tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plan_queues_every_side_seed_by_seed():
    args = parse(["--variant", "model.positions=learned", "--variant",
                  "pretrain.optimizer=adamw pretrain.lr=0.003", "--seeds", "3", "--name", "x"])
    runs = plan(args)
    assert [n for n, _, _ in runs[:3]] == ["x-base-s1", "x-positions-learned-s1",
                                           "x-optimizer-adamw-lr-0.003-s1"]
    assert len(runs) == 9 and [s for _, s, _ in runs] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    overrides = runs[2][2]
    assert overrides[0] == "base.seed=1" and overrides[-2:] == ["pretrain.optimizer=adamw",
                                                                "pretrain.lr=0.003"]
    assert "dpo.max_steps=0" in overrides  # the quick profile
    assert side_name("sft.lora.rank=4") == "rank-4"
    with pytest.raises(SystemExit):
        parse(["--variant", "a=1", "--seeds", "1"])
    # no variant: the baseline alone over its seeds (the table a default is judged on)
    alone = plan(parse(["--seeds", "2", "--profile", "full", "--name", "d"]))
    assert [(n, s) for n, s, _ in alone] == [("d-base-s1", 1), ("d-base-s2", 2)]
    assert alone[0][2] == ["base.seed=1"]
    with pytest.raises(SystemExit, match="key=value"):
        plan(parse(["--variant", "model.positions"]))


def stub_queue(monkeypatch, tmp_path, metric: str, score: dict[str, float]) -> list[str]:
    """``pipeline.compare`` with the DVC queue and the experiment store stubbed at their
    boundary: runs "finish" at once with ``score[name]`` as ``metric``; the report goes under
    ``tmp_path``. Returns the list the queued names are appended to."""
    import pipeline.compare as cmp

    queued: list[str] = []
    monkeypatch.setattr(cmp, "taken", lambda names: [])
    monkeypatch.setattr(cmp, "queue", lambda todo, target: queued.extend(n for n, _, _ in todo))
    monkeypatch.setattr(cmp, "wait", lambda names, jobs: dict.fromkeys(names, "Success"))
    monkeypatch.setattr(cmp, "collect", lambda names: {
        n: {metric: score[n]} for n in names if n in score})
    monkeypatch.setattr(cmp, "ROOT", tmp_path)
    return queued


def test_a_variant_can_be_compared_with_the_baseline_of_an_earlier_comparison(
        tmp_path, monkeypatch):
    import pipeline.compare as cmp

    args = parse(["--variant", "pretrain.max_steps=600", "--seed-list", "1,2", "--profile",
                  "full", "--name", "longer", "--base-from", "default-3seeds"])
    runs = plan(args)
    assert [n for n, _, _ in runs] == ["default-3seeds-base-s1", "longer-max-steps-600-s1",
                                       "default-3seeds-base-s2", "longer-max-steps-600-s2"]
    queued = stub_queue(monkeypatch, tmp_path, "evaluate/val/arithmetic_exact_match",
                        {"default-3seeds-base-s1": .2, "default-3seeds-base-s2": .3,
                         "longer-max-steps-600-s1": .6, "longer-max-steps-600-s2": .7})
    cmp.main(["--variant", "pretrain.max_steps=600", "--seed-list", "1,2", "--profile", "full",
              "--name", "longer", "--base-from", "default-3seeds",
              "--metric", "evaluate/val/arithmetic_exact_match"])
    assert queued == ["longer-max-steps-600-s1", "longer-max-steps-600-s2"]  # base ran before
    # a baseline run that is not there stops the comparison before anything is queued
    queued.clear()
    monkeypatch.setattr(cmp, "collect", lambda names: {})
    with pytest.raises(SystemExit, match="no finished run default-3seeds-base-s1, "
                                         "default-3seeds-base-s2"):
        cmp.main(["--variant", "pretrain.max_steps=600", "--seed-list", "1,2", "--profile",
                  "full", "--name", "longer", "--base-from", "default-3seeds"])
    assert queued == []
    result = json.loads((tmp_path / "reports/compare/longer.json").read_text())
    metric = result["metrics"]["evaluate/val/arithmetic_exact_match"]
    assert metric["sides"]["base"]["mean"] == pytest.approx(.25)
    assert metric["sides"]["max-steps-600"]["mean"] == pytest.approx(.65)


def test_a_labelled_side_of_code_is_compared_with_the_side_an_earlier_comparison_adopted(
        tmp_path, monkeypatch):
    """A change of code has no override: ``LABEL:`` names its side, and ``--base-side`` takes
    the baseline from the variant an earlier comparison adopted (the default of today)."""
    import pipeline.compare as cmp

    argv = ["--variant", "first-fit:", "--seed-list", "1,2", "--profile", "full", "--name",
            "pack", "--base-from", "arith2", "--base-side", "arithmetic-2"]
    runs = plan(parse(argv))
    assert [(n, o) for n, _, o in runs] == [
        ("arith2-arithmetic-2-s1", ["base.seed=1", *cmp.PROFILES["full"]]),
        ("pack-first-fit-s1", ["base.seed=1", *cmp.PROFILES["full"]]),
        ("arith2-arithmetic-2-s2", ["base.seed=2", *cmp.PROFILES["full"]]),
        ("pack-first-fit-s2", ["base.seed=2", *cmp.PROFILES["full"]])]
    queued = stub_queue(monkeypatch, tmp_path, "evaluate/val/count_exact_match",
                        {"arith2-arithmetic-2-s1": .6, "arith2-arithmetic-2-s2": .7,
                         "pack-first-fit-s1": .8, "pack-first-fit-s2": .9})
    cmp.main([*argv, "--metric", "evaluate/val/count_exact_match"])
    assert queued == ["pack-first-fit-s1", "pack-first-fit-s2"]
    result = json.loads((tmp_path / "reports/compare/pack.json").read_text())
    sides = result["metrics"]["evaluate/val/count_exact_match"]["sides"]
    assert sides["base"]["mean"] == pytest.approx(.65)
    assert sides["first-fit"]["mean"] == pytest.approx(.85)
    assert result["sides"] == {"base": "the arithmetic-2 side of comparison arith2",
                               "first-fit": "first-fit:"}
    with pytest.raises(SystemExit):
        parse(["--variant", "a:", "--seed-list", "1,2", "--base-side", "arithmetic-2"])
    with pytest.raises(SystemExit, match="side label"):
        plan(parse(["--variant", "bad label!: x=1", "--seed-list", "1,2"]))


def test_a_comparison_whose_names_are_taken_runs_nothing(tmp_path, monkeypatch):
    """Run again under the same name, a comparison would queue runs whose names the earlier
    experiments (or the queue's history) still hold, and read their figures as its own: it
    stops before queueing anything, naming them and the ways out."""
    import subprocess

    import pipeline.compare as cmp
    import pipeline.exp_queue as exp_queue

    queued = stub_queue(monkeypatch, tmp_path, "sft/val_bpb", {})
    monkeypatch.setattr(cmp, "taken", exp_queue.taken)
    out = {("exp", "list"): "c-base-s1\nother-base-s1\n",  # experiments that exist
           ("queue", "status"): "Task  Name  Created  Status\nab12  c-v-s2  03:11 PM  Success\n"}
    monkeypatch.setattr(exp_queue, "dvc", lambda *args, check=True: subprocess.CompletedProcess(
        ["dvc", *args], 0, out[args[:2]], ""))
    with pytest.raises(SystemExit, match=r"named c-base-s1, c-v-s2 exist already.*--report-only"):
        cmp.main(["--variant", "v: sft.lr=0.01", "--seed-list", "1,2", "--name", "c"])
    assert queued == []
    assert exp_queue.taken({"d-base-s1", "d-v-s1"}) == []  # another name runs


def test_only_finished_experiments_are_read():
    """DVC lists a queued, running or failed experiment with the metrics files of the commit
    it started from: another run's figures, which must not count as this seed's."""
    from pipeline.exp_queue import experiment_metrics

    def exp(name, executor=None, error=None, value=0.5):
        return {"name": name, "executor": executor,
                "revs": [{"name": name, "error": error, "data": {"metrics": {
                    "metrics/evaluate.json": {"data": {"evaluate/val/x": value}}}}}]}

    show = [{"rev": "abc", "experiments": [
        exp("c-base-s1", value=0.9),
        exp("c-base-s2", executor={"state": "queued"}),
        exp("c-base-s3", executor={"state": "running"}),
        exp("c-base-s4", error={"msg": "Experiment run failed", "type": ""}),
        exp("c-base-s5", executor={"state": "failed"})]}]
    found = experiment_metrics({f"c-base-s{i}" for i in range(1, 6)}, show)
    assert found == {"c-base-s1": {"evaluate/val/x": 0.9}}


def test_extend_adds_seeds_to_a_report_whose_experiments_are_gone(tmp_path, monkeypatch):
    """``--extend`` reads the runs an earlier report holds (here one written before reports
    kept ``runs``: its per-side values in plan order, less the missing run) and runs only the
    others; the new report keeps every run, so it can be extended again."""
    import pipeline.compare as cmp

    metric = "evaluate/val/count_exact_match"
    argv = ["--variant", "v: sft.max_steps=9", "--profile", "full", "--name", "ext",
            "--metric", metric, "--report", "count_exact_match"]
    old = {"name": "ext", "profile": "full", "seeds": [7, 1, 2],
           "sides": {"base": "", "v": "v: sft.max_steps=9"}, "missing": ["ext-v-s2"],
           "metrics": {metric: {"sides": {"base": {"values": [.1, .2, .3]},
                                          "v": {"values": [.5, .6]}}}},
           "reported": {"evaluate/final/count_exact_match": {"sides": {
               "base": {"values": [.11, .21, .31]}, "v": {"values": [.51, .61]}}}}}
    (tmp_path / "reports/compare").mkdir(parents=True)
    (tmp_path / "reports/compare/ext.json").write_text(json.dumps(old))
    queued = stub_queue(monkeypatch, tmp_path, metric, {"ext-v-s2": .7, "ext-base-s3": .4,
                                                       "ext-v-s3": .8})
    cmp.main([*argv, "--seed-list", "7,1,2,3", "--extend"])
    assert queued == ["ext-v-s2", "ext-base-s3", "ext-v-s3"]
    result = json.loads((tmp_path / "reports/compare/ext.json").read_text())
    assert result["metrics"][metric]["sides"]["base"]["values"] == [.1, .2, .3, .4]
    assert result["metrics"][metric]["sides"]["v"]["values"] == [.5, .6, .7, .8]
    assert result["runs"]["ext-base-s1"] == {"seed": 1, "source": "report", "metrics": {
        metric: .2, "evaluate/final/count_exact_match": .21}}
    assert result["runs"]["ext-v-s3"]["source"] == "experiment"
    assert result["missing"] == []
    # the new report holds its runs: nothing is left to run, nothing changes
    queued.clear()
    cmp.main([*argv, "--seed-list", "7,1,2,3", "--extend"])
    assert queued == []
    again = json.loads((tmp_path / "reports/compare/ext.json").read_text())
    assert again["metrics"] == result["metrics"]
    # a report of another recipe is not extended
    with pytest.raises(SystemExit, match="another comparison"):
        cmp.main(["--variant", "v: sft.max_steps=10", "--profile", "full", "--name", "ext",
                  "--seed-list", "7,1", "--extend"])


def test_the_baseline_of_an_earlier_comparison_is_read_from_its_report_once_its_runs_are_gone(
        tmp_path, monkeypatch):
    """``--base-from NAME`` in a checkout without NAME's experiments: the baseline runs NAME's
    report holds are its figures; only the variant runs, and a seed the report lacks stops
    the comparison before anything is queued."""
    import pipeline.compare as cmp

    metric = "evaluate/val/reverse_exact_match"
    old = {"name": "old", "profile": "full", "runs": {
        "old-base-s1": {"seed": 1, "source": "experiment", "metrics": {metric: .4}},
        "old-base-s2": {"seed": 2, "source": "experiment", "metrics": {metric: .5}},
        "old-other-s1": {"seed": 1, "source": "experiment", "metrics": {metric: .9}}}}
    (tmp_path / "reports/compare").mkdir(parents=True)
    (tmp_path / "reports/compare/old.json").write_text(json.dumps(old))
    queued = stub_queue(monkeypatch, tmp_path, metric, {"new-v-s1": .6, "new-v-s2": .7})
    argv = ["--variant", "v: base.dtype=bfloat16", "--profile", "full", "--name", "new",
            "--base-from", "old", "--metric", metric, "--report", "count_exact_match"]
    cmp.main([*argv, "--seed-list", "1,2"])
    assert queued == ["new-v-s1", "new-v-s2"]
    result = json.loads((tmp_path / "reports/compare/new.json").read_text())
    assert result["metrics"][metric]["sides"]["base"]["values"] == [.4, .5]
    assert result["metrics"][metric]["sides"]["v"]["values"] == [.6, .7]
    assert result["runs"]["old-base-s2"]["source"] == "report"
    assert "old-other-s1" not in result["runs"]
    queued.clear()
    with pytest.raises(SystemExit, match="no finished run old-base-s3"):
        cmp.main([*argv, "--seed-list", "1,3"])
    assert queued == []
    with pytest.raises(SystemExit, match="ran profile 'full'"):
        cmp.main([*argv[:2], "--profile", "quick", *argv[4:], "--seed-list", "1,2"])


def test_a_report_of_an_earlier_definition_of_its_profile_is_not_reused(tmp_path, monkeypatch):
    """A profile's steps change over time: a report records what its profile set, and one
    made with other steps (or an older report of the quick profile, which recorded nothing
    and ran 400 SFT steps) gives neither a baseline nor runs to extend."""
    import pipeline.compare as cmp

    metric = "evaluate/val/spell_exact_match"
    runs = {f"old-base-s{i}": {"seed": i, "source": "experiment", "metrics": {metric: .3}}
            for i in (1, 2)}
    queued = stub_queue(monkeypatch, tmp_path, metric, {"new-v-s1": .6, "new-v-s2": .7,
                                                       "old-base-s1": .3, "old-base-s2": .3})
    (tmp_path / "reports/compare").mkdir(parents=True)
    argv = ["--variant", "v: sft.lr=0.01", "--name", "new", "--base-from", "old", "--metric",
            metric, "--seed-list", "1,2"]
    for recorded in (None, ["sft.max_steps=5"]):
        old = {"name": "old", "profile": "quick", "runs": runs}
        if recorded is not None:
            old["profile_overrides"] = recorded
        (tmp_path / "reports/compare/old.json").write_text(json.dumps(old))
        with pytest.raises(SystemExit, match="ran profile 'quick' as .*another recipe's"):
            cmp.main(argv)
    assert queued == []
    # recorded as today's quick profile: the baseline is read from it, the variant runs
    old["profile_overrides"] = cmp.PROFILES["quick"]
    (tmp_path / "reports/compare/old.json").write_text(json.dumps(old))
    cmp.main(argv)
    assert queued == ["new-v-s1", "new-v-s2"]
    report = json.loads((tmp_path / "reports/compare/new.json").read_text())
    assert report["profile_overrides"] == cmp.PROFILES["quick"]
    assert "sft.max_steps=700" in report["profile_overrides"]
