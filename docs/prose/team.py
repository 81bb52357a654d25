"""Figures of the team page: the three-namespace test's phases (reports/team_test.json)."""

from __future__ import annotations

from docs.figures import Read, figure, missing

REPORT = "reports/team_test.json"
PHASES = (
    ("team_up_s", "`python -m pipeline.team up` on the hub (fresh: initdb, migrations)"),
    ("run_a_s", "first run (fetch, tokenizer, pack, pretrain) triggered from the laptop, "
     "until Completed"),
    ("runs_a_b_until_push_failed_s", "both runs, the second failing at its push (DVC remote "
     "down)"),
    ("run_b_again_pushed_s", "the second run triggered again: push only"),
    ("crashed_after_kill_s", "worker's process tree SIGKILLed mid-pretrain, until its flow "
     "run is Crashed"),
    ("rerun_after_crash_s", "the same run again on a restarted worker, resuming from the "
     "checkpoint"),
    ("mlflow_down_failed_s", "MLflow server stopped mid-pretrain, until the run is Failed"),
    ("test_s", "the whole test, namespaces made and deleted"),
)


@figure("team-test-times")
def team_test_times(read: Read) -> str:
    """The seconds of each phase of the last `make team-test` whose report was committed."""
    data = read(REPORT)
    if not data:
        return missing(REPORT)
    out = ["", "| phase | seconds |", "|---|---|"]
    for key, what in PHASES:
        if key in data:
            out.append(f"| {what} | {data[key]:.0f} |")
    return "\n".join(out) + "\n"


@figure("team-up-seconds")
def team_up_seconds(read: Read) -> str:
    data = read(REPORT)
    if not data or "team_up_s" not in data:
        return missing(REPORT)
    return f"{data['team_up_s']:.0f} s"
