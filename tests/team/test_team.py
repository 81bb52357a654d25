"""The team stack across real network hops: ``hub`` (PostgreSQL, the MLflow and Prefect
servers, sshd with the git and DVC remotes), ``gpu-box`` (a Prefect worker in a persistent
checkout) and ``laptop`` (a clone that triggers runs and reads results), three network
namespaces on one segment (tests/team/hosts.py).

Run by ``make team-test`` (after ``make test`` in CI); skipped elsewhere, with the reason.
The tests of this module run in order on one stack: two runs, then the faults (the worker
killed mid-stage, the MLflow server down when a stage finishes, the DVC remote down at push).
Each phase's seconds go to ``$LLMCORE_TEAM_REPORT`` (JSON) when that is set.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, kill_tree, project_env
from tests.stages.pipeline import TINY
from tests.team.hosts import Lan

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = ("fetch", "tokenizer", "pack", "pretrain")
RUN_TIMEOUT_S = 240
# the zombie automation fires CRASH_AFTER_S after the last heartbeat (every HEARTBEAT_S); the
# triggers service evaluates proactive triggers every few seconds
CRASH_BOUND_S = 120

pytestmark = [pytest.mark.slow]


def _why_not() -> str | None:
    if os.environ.get("LLMCORE_TEAM_TEST") != "1":
        return ("the team stack's test runs with `make team-test` (three network namespaces, "
                "PostgreSQL, sshd; about 10 minutes)")
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd is not installed (`make team-setup`)"
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "PostgreSQL is not installed (`make team-setup`)"
    for module in ("dvc_ssh", "psycopg", "flask_wtf"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module} is missing (`make team-setup`)"
    return None


if (_reason := _why_not()) is not None:
    pytest.skip(_reason, allow_module_level=True)


class Team:
    """The three hosts, the hub's state, the laptop's checkout and the worker process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.lan = Lan(base)
        self.state = base / "hub"
        self.laptop = base / "laptop" / "llmcore"
        self.checkout = base / "gpu-box" / "llmcore"
        self.worker_log = base / "worker.log"
        self.worker: subprocess.Popen | None = None
        self.times: dict[str, float] = {}
        self.env = project_env()
        self.commit = ""

    # --- hosts --------------------------------------------------------------------------
    def on(self, host: str, *args: str, timeout: float = 300,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.lan.python(host, *args), cwd=cwd or self.laptop,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def hub(self, *args: str) -> subprocess.CompletedProcess:
        return self.on("hub", "-m", "pipeline.team", "--state", str(self.state), *args,
                       cwd=REPO)

    def up(self) -> float:
        start = time.monotonic()
        done = self.hub("up", "--host", self.lan.addr["hub"])
        assert done.returncode == 0, done.stdout + done.stderr
        return time.monotonic() - start

    def ask(self, *args: str) -> dict:
        done = self.on("laptop", str(HERE / "laptop.py"), *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def start_worker(self) -> None:
        key = self.lan.home("gpu-box") / ".ssh" / "id_ed25519"
        with open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen(
                self.lan.python("gpu-box", "-m", "pipeline.team", "worker", "--checkout",
                                str(self.checkout), "--env", str(self.state / "client.env"),
                                "--key", str(key)),
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def kill_worker(self) -> None:
        if self.worker is not None:
            kill_tree(self.worker.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(30)

    # --- runs -----------------------------------------------------------------------------
    def trigger(self, name: str, **overrides: object) -> str:
        args = ["-m", "pipeline.team", "run", "--name", name, "--commit", self.commit]
        for stage in STAGES:
            args += ["--stage", stage]
        for key, value in overrides.items():
            args += ["--set", f"{key}={value}"]
        done = self.on("laptop", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["flow_run_id"]

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT_S,
             until: tuple[str, ...] = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.ask("state", run_id)
            if st.get("type") in until:
                return st
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not in {until} after {timeout}s: {st}\n"
                             f"{self.worker_tail()}")

    def worker_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def checkpoints(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for step in glob.glob(str(self.checkout / "data/checkpoints/pretrain/*/step-*")):
            out.setdefault(Path(step).parent.name, []).append(int(Path(step).name[5:]))
        return {k: sorted(v) for k, v in out.items()}

    def wait_new_checkpoint(self, before: dict, min_step: int, timeout: float = 180) -> None:
        """Until pretrain of a run not seen in ``before`` has saved step >= ``min_step``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, steps in self.checkpoints().items():
                if key not in before and steps and steps[-1] >= min_step:
                    return
            time.sleep(0.02)
        raise AssertionError(f"no new pretrain checkpoint >= {min_step}\n{self.worker_tail()}")

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = round(seconds, 1)
        report = os.environ.get("LLMCORE_TEAM_REPORT")
        if report:
            Path(report).parent.mkdir(parents=True, exist_ok=True)
            Path(report).write_text(json.dumps(self.times, indent=1) + "\n")


def _names(node: object) -> set[str]:
    """Every ``name`` in ``dvc exp show --json`` (its nesting differs between DVC versions)."""
    if isinstance(node, list):
        return set().union(*(_names(x) for x in node)) if node else set()
    if isinstance(node, dict):
        own = {node["name"]} if isinstance(node.get("name"), str) else set()
        return own.union(*(_names(v) for v in node.values())) if node else own
    return set()


def _make_checkout(team: Team) -> None:
    """The laptop's clone: this repository with the tiny params committed (600 pretrain
    steps, a checkpoint every 20), no lock file yet, pushed to the hub."""
    team.laptop.mkdir(parents=True)
    copy_project(team.laptop)
    params = yaml.safe_load((team.laptop / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    params.setdefault("flow", {})["retries"] = 0  # a fault fails its run at once (the test checks the line)
    (team.laptop / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (team.laptop / "dvc.lock").unlink(missing_ok=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny params"]):
        subprocess.run(cmd, cwd=team.laptop, env=team.env, check=True)


@pytest.fixture(scope="module")
def team():
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="llmc-team-"))
    os.chmod(base, 0o755)  # PostgreSQL's own user reaches its folder under the hub's
    t = Team(base)
    problem = t.lan.up()
    try:
        if problem:
            pytest.skip(f"cannot make three network namespaces here: {problem}")
        t.record("team_up_s", t.up())
        for host in ("gpu-box", "laptop"):
            key = t.lan.home(host) / ".ssh" / "id_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
            done = t.hub("authorize", f"{key}.pub")
            assert done.returncode == 0, done.stderr
        _make_checkout(t)
        done = t.on("laptop", "-m", "pipeline.team", "connect", "--env",
                    str(t.state / "client.env"), "--key",
                    str(t.lan.home("laptop") / ".ssh" / "id_ed25519"))
        assert done.returncode == 0, done.stdout + done.stderr
        push = subprocess.run(t.lan.cmd("laptop", "git", "push", "-q", "team", "HEAD:main"),
                              cwd=t.laptop, env=t.env, capture_output=True, text=True)
        assert push.returncode == 0, push.stderr
        t.commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=t.laptop,
                                  capture_output=True, text=True).stdout.strip()
        t.start_worker()
        yield t
    finally:
        t.kill_worker()
        with contextlib.suppress(Exception):
            t.hub("down")
        t.lan.down()
        # whatever the hub started that is still there (a failed `down`)
        for pid_file in (t.state / "run").glob("*.pid") if (t.state / "run").exists() else []:
            with contextlib.suppress(Exception):
                kill_tree(int(pid_file.read_text().split()[0]))
        t.record("test_s", time.monotonic() - began)
        if os.environ.get("LLMCORE_TEAM_KEEP") != "1":  # 1: keep the logs and checkouts
            shutil.rmtree(base, ignore_errors=True)


def test_unauthenticated_requests_are_refused(team):
    got = team.ask("refused")
    assert got["mlflow_no_credentials"] == 401 and got["mlflow_wrong_password"] == 401
    assert got["mlflow_ui_no_credentials"] == 401 and got["mlflow_ui_with_credentials"] == 200
    assert got["prefect_no_credentials"] == 401 and got["prefect_wrong_auth"] == 401
    assert got["prefect_with_auth"] == 200
    assert got["postgres_from_laptop"] != "open"  # PostgreSQL listens on the hub's loopback
    assert got["ssh_without_key"] != 0 and "Permission denied" in got["ssh_without_key_says"]


def test_two_runs_reach_the_laptop_and_a_dead_remote_loses_nothing(team):
    start = time.monotonic()
    a = team.trigger("lr-a", **{"pretrain.lr": 0.002})
    b = team.trigger("lr-b", **{"pretrain.lr": 0.004})
    assert team.wait(a)["type"] == "COMPLETED", team.worker_tail()
    team.record("run_a_s", time.monotonic() - start)
    # the DVC remote (the hub's sshd) goes away while run b trains: its push must fail
    done = team.hub("status")
    assert json.loads(done.stdout)["sshd"], done.stdout
    from pipeline.team import services
    from pipeline.team.settings import Hub

    hub = Hub.load(team.state)
    services.stop(hub, "sshd")
    st = team.wait(b)
    assert st["type"] == "FAILED", st
    assert "dvc exp push team lr-b failed" in st["message"] and "Nothing is lost" in st["message"]
    exps = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
                          cwd=team.checkout, env=team.env, capture_output=True, text=True)
    assert "lr-b" in exps.stdout.split(), exps.stdout + exps.stderr  # kept on the worker
    team.record("runs_a_b_until_push_failed_s", time.monotonic() - start)
    team.up()  # sshd back
    again = time.monotonic()
    b2 = team.trigger("lr-b", **{"pretrain.lr": 0.004})
    assert team.wait(b2)["type"] == "COMPLETED", team.worker_tail()
    team.record("run_b_again_pushed_s", time.monotonic() - again)

    seen = team.ask("runs", "lr-a", "lr-b")
    for name in ("lr-a", "lr-b"):
        finished = [r for r in seen[name]["runs"] if r["status"] == "FINISHED"]
        stages = {r["stage"] for r in finished}
        # run b found fetch, tokenizer and pack in DVC's run cache: only a's ran them
        assert (set(STAGES) if name == "lr-a" else {"pretrain"}) <= stages, seen[name]
        assert {r["host"] for r in finished} == {"gpu-box"}
        assert {r["git_commit"] for r in finished if r["stage"] != "pipeline"} == {team.commit}
        assert all(r["artifact_uri"].startswith("mlflow-artifacts:") for r in finished)
        pretrain = next(r for r in finished if r["stage"] == "pretrain")
        assert pretrain["metrics"]["pretrain/steps"] == 600 and pretrain["data_tags"]
        versions = seen[name]["versions"]
        assert len(versions) == 1 and versions[0]["tags"]["git_commit"] == team.commit
        assert versions[0]["tags"]["param.pretrain.lr"] == str(
            {"lr-a": 0.002, "lr-b": 0.004}[name])
    registered = {v["version"] for n in ("lr-a", "lr-b") for v in seen[n]["versions"]}
    assert seen["best"] in registered  # models:/llmcore-pretrain@best is one of them
    pulled = subprocess.run(team.lan.cmd("laptop", "dvc", "exp", "pull", "--no-cache", "team",
                                         "lr-a", "lr-b"),
                            cwd=team.laptop, env=team.env, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    show = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                          cwd=team.laptop, env=team.env, capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert {"lr-a", "lr-b"} <= _names(json.loads(show.stdout)), show.stdout[:2000]
    got = team.ask("weights", "lr-a")
    assert got["equal"] and got["tensors"] > 0, got


def test_a_killed_worker_crashes_its_run_and_the_rerun_resumes(team):
    before = team.checkpoints()
    k = team.trigger("lr-k", **{"pretrain.lr": 0.003})
    team.wait_new_checkpoint(before, 100)
    team.kill_worker()  # the worker, the flow run, dvc and the stage: all SIGKILLed
    killed = time.monotonic()
    st = team.wait(k, timeout=CRASH_BOUND_S + 60, until=("CRASHED", "COMPLETED", "FAILED"))
    assert st["type"] == "CRASHED", st
    team.record("crashed_after_kill_s", time.monotonic() - killed)
    assert time.monotonic() - killed <= CRASH_BOUND_S
    partial = max(max(s) for key, s in team.checkpoints().items() if key not in before)
    assert 100 <= partial < 600
    team.start_worker()
    start = time.monotonic()
    k2 = team.trigger("lr-k", **{"pretrain.lr": 0.003})
    assert team.wait(k2)["type"] == "COMPLETED", team.worker_tail()
    team.record("rerun_after_crash_s", time.monotonic() - start)
    resumed = [r for r in team.ask("runs", "lr-k")["lr-k"]["runs"]
               if r["stage"] == "pretrain" and r["status"] == "FINISHED"]
    assert resumed and resumed[0]["metrics"]["pretrain/resumed_from"] >= 100, resumed
    r = team.trigger("lr-k-fresh", **{"pretrain.lr": 0.003, "pretrain.resume": "never"})
    assert team.wait(r)["type"] == "COMPLETED", team.worker_tail()
    got = team.ask("same", "lr-k", "lr-k-fresh")
    assert got["equal"], got  # resumed after the kill == never interrupted


def test_mlflow_down_when_a_stage_finishes_fails_it_in_one_line(team):
    from pipeline.team import services
    from pipeline.team.settings import Hub

    before = team.checkpoints()
    m = team.trigger("lr-m", **{"pretrain.lr": 0.005})
    team.wait_new_checkpoint(before, 20)
    services.stop(Hub.load(team.state), "mlflow")
    stopped = time.monotonic()
    st = team.wait(m)
    assert st["type"] == "FAILED", st
    team.record("mlflow_down_failed_s", time.monotonic() - stopped)
    lines = [ln for ln in st["message"].splitlines() if "cannot be reached" in ln]
    assert len(lines) == 1 and lines[0].startswith("pretrain: error: the MLflow server"), st
    assert "Traceback" not in st["message"]
    team.up()  # the MLflow server back: the failed run registered nothing
    seen = team.ask("runs", "lr-m")["lr-m"]
    assert seen["versions"] == [], seen


def test_backup_dumps_the_databases_users_included(team):
    dest = team.base / "backup"
    done = team.hub("backup", str(dest))
    assert done.returncode == 0, done.stdout + done.stderr
    dumps = {p.name.split("-", 2)[-1]: p for p in dest.iterdir()}
    assert {"mlflow.dump", "mlflow_auth.dump", "prefect.dump", "mlartifacts.tar.gz",
            "git.tar.gz", "dvc-remote.tar.gz"} <= set(dumps), sorted(dumps)
    listing = subprocess.run(["pg_restore", "--list", str(dumps["mlflow_auth.dump"])],
                             capture_output=True, text=True)
    assert listing.returncode == 0 and " users " in listing.stdout, listing.stderr


def test_no_secret_is_in_any_log(team):
    secrets = json.loads((team.state / "secrets.json").read_text())
    logs = [*sorted((team.state / "logs").glob("*.log")), team.worker_log]
    assert len(logs) >= 5  # postgres, sshd, mlflow, prefect, the worker
    for log in logs:
        text = log.read_text(errors="replace")
        leaked = [name for name, value in secrets.items() if value in text]
        assert not leaked, f"{log.name} holds the secrets {leaked}"
