"""The hub up and down: PostgreSQL, the MLflow and Prefect servers, sshd, and what they hold.

``up`` is idempotent (a running server is left alone; users, roles and Prefect objects are
made once and their passwords reset to the hub's secrets), ``down`` stops every server and
keeps the data (``<state>/postgres``, ``mlartifacts``, ``git``, ``dvc-remote``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.team import services as sv
from pipeline.team.settings import (
    CRASH_AFTER_S,
    DEPLOYMENT,
    MLFLOW_USER,
    POOL,
    Hub,
    client_env,
    load_secrets,
    write_env_file,
    write_private,
)

ZOMBIE_AUTOMATION = "llmcore: crash flow runs whose heartbeats stopped"


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "PG"))}
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1")
    return env


def pg_url(hub: Hub, driver: str, user: str, password: str, db: str) -> str:
    return f"{driver}://{user}:{password}@127.0.0.1:{hub.ports['postgres']}/{db}"


def start_mlflow(hub: Hub, sec: dict[str, str]) -> None:
    ini = hub.path("mlflow", "basic_auth.ini")
    auth_db = pg_url(hub, "postgresql+psycopg", "mlflow", sec["pg_mlflow"], "mlflow_auth")
    # every signed-in user may edit (a team shares its experiments); no one else gets in
    write_private(ini, "[mlflow]\ndefault_permission = EDIT\n"
                  f"database_uri = {auth_db}\nadmin_username = admin\n"
                  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**base_env(),
           "MLFLOW_BACKEND_STORE_URI": pg_url(hub, "postgresql+psycopg", "mlflow", sec["pg_mlflow"],
                                              "mlflow"),
           "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": sec["mlflow_admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["flask_secret"],
           # its job runner serves MLflow's GenAI evaluations, which nothing here uses: two
           # consumer processes less on the hub
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    hub.path("mlartifacts").mkdir(parents=True, exist_ok=True)
    args = [sv.python_bin(), "-m", "mlflow", "server", "--serve-artifacts",
            "--artifacts-destination", str(hub.path("mlartifacts")), "--host", hub.listen,
            "--port", str(hub.ports["mlflow"]), "--app-name", "basic-auth", "--workers", "1",
            "--allowed-hosts", f"{hub.host},{hub.host}:{hub.ports['mlflow']},localhost,"
            f"127.0.0.1,localhost:{hub.ports['mlflow']},127.0.0.1:{hub.ports['mlflow']}"]
    sv.spawn(hub, "mlflow", args, env)
    url = f"{hub.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    sv.wait_until(lambda: sv.http_status(url, ("admin", sec["mlflow_admin"])) == 200,
                  "the MLflow server", hub, "mlflow", 120)
    ensure_mlflow_user(hub, sec)


def _mlflow_call(hub: Hub, sec: dict[str, str], method: str, path: str,
                 body: dict) -> int | None:
    return sv.http_status(f"{hub.mlflow_url}{path}", ("admin", sec["mlflow_admin"]), method,
                          body, timeout=30)


def ensure_mlflow_user(hub: Hub, sec: dict[str, str]) -> None:
    """The account clients use: made once, its password reset to the hub's secret."""
    body = {"username": MLFLOW_USER, "password": sec["mlflow_team"]}
    if _mlflow_call(hub, sec, "POST", "/api/2.0/mlflow/users/create", body) == 200:
        return
    code = _mlflow_call(hub, sec, "PATCH", "/api/2.0/mlflow/users/update-password", body)
    if code != 200:
        raise sv.StackError(f"the MLflow server refused to set up user {MLFLOW_USER!r} "
                            f"(HTTP {code}); its log: {hub.path('logs', 'mlflow.log')}")


def start_prefect(hub: Hub, sec: dict[str, str]) -> None:
    env = {**base_env(),
           "PREFECT_HOME": str(hub.path("prefect")),
           "PREFECT_API_DATABASE_CONNECTION_URL": pg_url(
               hub, "postgresql+asyncpg", "prefect", sec["pg_prefect"], "prefect"),
           "PREFECT_SERVER_API_AUTH_STRING": f"admin:{sec['prefect_auth']}",
           "PREFECT_API_AUTH_STRING": f"admin:{sec['prefect_auth']}"}
    hub.path("prefect").mkdir(parents=True, exist_ok=True)
    args = [sv.python_bin(), "-m", "prefect", "server", "start", "--host", hub.listen,
            "--port", str(hub.ports["prefect"])]
    sv.spawn(hub, "prefect", args, env)
    url = f"{hub.prefect_api}/health"
    sv.wait_until(lambda: sv.http_status(url, ("admin", sec["prefect_auth"])) == 200,
                  "the Prefect server", hub, "prefect", 180)


def configure_prefect(hub: Hub, sec: dict[str, str]) -> None:
    """The process work pool, the zombie-run automation and the team deployment (idempotent)."""
    os.environ.update(PREFECT_API_URL=hub.prefect_api,
                      PREFECT_API_AUTH_STRING=f"admin:{sec['prefect_auth']}")
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    from pipeline.team.flow import team_pipeline

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                   base_job_template=template))
        flow_name, dep_name = DEPLOYMENT.split("/")
        flow_id = client.create_flow_from_name(flow_name)
        # the run's code is the worker's own checkout: it changes into it and checks out the
        # commit the run names before the flow is imported (pipeline/team/steps.py)
        client.create_deployment(
            flow_id, dep_name, work_pool_name=POOL,
            entrypoint="pipeline/team/flow.py:team_pipeline",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $LLMCORE_WORKER_CHECKOUT }}"}},
                        {"pipeline.team.steps.checkout_commit": {}}],
            parameter_openapi_schema=parameter_schema(team_pipeline).model_dump_for_openapi(),
            enforce_parameter_schema=True,
            description="The llmcore pipeline at a named commit, on a worker of pool llmcore")
    # Automation's methods are typed as coroutines (Prefect's sync/async dual API); called
    # outside an event loop they run at once
    automations: Any = Automation
    try:
        automations.read(name=ZOMBIE_AUTOMATION)
    except (ValueError, ObjectNotFound):
        automation: Any = Automation(
                name=ZOMBIE_AUTOMATION,
                trigger=EventTrigger(
                    after={"prefect.flow-run.heartbeat"},
                    expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                            "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                            "prefect.flow-run.Crashed"},
                    match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                    for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                    within=timedelta(seconds=CRASH_AFTER_S)),
                actions=[ChangeFlowRunState(state=StateType.CRASHED, name=None, force=False,
                                            message=f"no heartbeat for {CRASH_AFTER_S}s: its "
                                            "worker died; run it again to resume")],
            )
        with contextlib.suppress(ObjectAlreadyExists):
            automation.create()


def init_repos(hub: Hub) -> None:
    bare = hub.path("git", "llmcore.git")
    if not (bare / "HEAD").exists():
        bare.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(bare)],
                       check=True)
    hub.path("dvc-remote").mkdir(parents=True, exist_ok=True)


def up(hub: Hub, log=print) -> float:
    """Start the hub; the seconds it took."""
    start = time.perf_counter()
    hub.state.mkdir(parents=True, exist_ok=True)
    os.chmod(hub.state, 0o711)  # the postgres user reaches its folder, no one lists the rest
    hub.save()
    sec = load_secrets(hub)
    sv.start_postgres(hub, sec["postgres"])
    sv.ensure_database(hub, sec["postgres"], "mlflow", "mlflow", sec["pg_mlflow"])
    sv.ensure_database(hub, sec["postgres"], "mlflow_auth", "mlflow", sec["pg_mlflow"])
    sv.ensure_database(hub, sec["postgres"], "prefect", "prefect", sec["pg_prefect"])
    # Prefect's PostgreSQL migrations need trigram indexes (an extension only a superuser adds)
    sv.psql(hub, sec["postgres"], "CREATE EXTENSION IF NOT EXISTS pg_trgm", db="prefect")
    log(f"team: PostgreSQL up on 127.0.0.1:{hub.ports['postgres']} ({hub.path('postgres')})")
    init_repos(hub)
    sv.start_sshd(hub, base_env())
    log(f"team: git remote {hub.git_url}, DVC remote {hub.dvc_url}")
    start_mlflow(hub, sec)
    log(f"team: MLflow at {hub.mlflow_url} (basic auth; user {MLFLOW_USER!r})")
    start_prefect(hub, sec)
    configure_prefect(hub, sec)
    log(f"team: Prefect at {hub.prefect_api} (auth string), pool {POOL!r}, "
        f"deployment {DEPLOYMENT!r}")
    env = client_env(hub, sec)
    env["LLMCORE_TEAM_HOST_KEY"] = hub.path("ssh", "host_ed25519.pub").read_text().strip()
    write_env_file(hub.path("client.env"), env)
    seconds = time.perf_counter() - start
    log(f"team: up in {seconds:.1f}s; give each host {hub.path('client.env')} (private) and "
        f"authorize its SSH key: python -m pipeline.team authorize KEY.pub")
    return seconds


def down(hub: Hub, log=print) -> None:
    for name in ("prefect", "mlflow", "sshd"):
        if sv.stop(hub, name):
            log(f"team: stopped {name}")
    if sv.stop_postgres(hub):
        log("team: stopped PostgreSQL")


def status(hub: Hub) -> dict[str, bool]:
    out = {name: sv.running_pid(hub, name) is not None for name in ("sshd", "mlflow", "prefect")}
    out["postgres"] = sv.port_open("127.0.0.1", hub.ports["postgres"])
    return out


def backup(hub: Hub, dest: Path, log=print) -> list[Path]:
    """The three databases (``pg_dump -Fc``: runs, registry, MLflow's users, Prefect's state)
    and the artifact, git and DVC stores as tarballs, into ``dest``."""
    sec = load_secrets(hub)
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = []
    env = {**os.environ, "PGPASSWORD": sec["postgres"]}
    for db in ("mlflow", "mlflow_auth", "prefect"):
        out = dest / f"{stamp}-{db}.dump"
        subprocess.run(["pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(hub.ports["postgres"]),
                        "-U", "postgres", "-f", str(out), db], env=env, check=True)
        written.append(out)
    for folder in ("mlartifacts", "git", "dvc-remote"):
        out = dest / f"{stamp}-{folder}.tar.gz"
        subprocess.run(["tar", "czf", str(out), "-C", str(hub.state), folder], check=True)
        written.append(out)
    for path in written:
        log(f"team: backed up {path}")
    return written
