"""Figures of the team page: the three-namespace test's phases (reports/team_test.json)."""

from __future__ import annotations

import importlib

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


# the settings the page quotes, read from the code that uses them (not measurements)
def _setting(name: str, module: str, attr: str, text: str) -> None:
    @figure(name)
    def quote(read: Read) -> str:
        return text.format(getattr(importlib.import_module(module), attr))


_setting("team-ssh-timeout", "pipeline.team.client", "SSH_TIMEOUT_S", "{} s")
_setting("team-heartbeat", "pipeline.team.settings", "HEARTBEAT_S", "every {} s")
_setting("team-crash-after", "pipeline.team.settings", "CRASH_AFTER_S", "{} s")


@figure("team-mlflow-giveup")
def team_mlflow_giveup(read: Read) -> str:
    """How long an MLflow call to a dead server retries: the backoff's sleeps added up."""
    from pipeline.team.settings import MLFLOW_CLIENT_LIMITS

    retries = int(MLFLOW_CLIENT_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(MLFLOW_CLIENT_LIMITS["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    return f"~{factor * sum(2**i for i in range(retries)):.0f} s"
