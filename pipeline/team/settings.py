"""Where the hub keeps its state, which ports it listens on, and its secrets.

Secrets are generated once, on the first ``up``, into ``<state>/secrets.json`` (mode 0600) and
never printed: the servers get them through their environment (a password on a command line
would show in ``ps``), clients through ``<state>/client.env`` (mode 0600, copied to each host
by whoever runs the team, like an SSH key). Nothing secret is ever committed: the checkout's
own copy, ``team.env``, is git-ignored.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# what each server is reached on; the hub's address comes from ``--host``
PORTS = {"postgres": 5432, "mlflow": 5000, "prefect": 4200, "ssh": 2222}
REMOTE = "team"  # the git remote and the DVC remote of every checkout, named alike
POOL = "llmcore"  # the Prefect work pool (process type) every worker serves
DEPLOYMENT = "llm-team-pipeline/team"
MLFLOW_USER = "team"  # the account clients log with (the admin account only manages users)
# a flow run whose heartbeats stop for CRASH_AFTER_S is marked Crashed (workers send one every
# HEARTBEAT_S, Prefect's minimum): a dead worker's run is Crashed within about the sum
HEARTBEAT_S = 30
CRASH_AFTER_S = 45
SECRET_NAMES = ("postgres", "pg_mlflow", "pg_prefect", "mlflow_admin", "mlflow_team",
                "flask_secret", "prefect_auth")
# an MLflow call to a server that is down fails after ~7 s (retries sleep 1, 2, 4 s), not the
# client's default of minutes: a stage then says so in one line (docs/teams.md)
MLFLOW_CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def default_state_dir() -> Path:
    # PostgreSQL runs as the `postgres` user when the hub is started by root: its folder must
    # be reachable by that user, which /root is not
    if os.geteuid() == 0:
        return Path("/var/lib/llmcore-team")
    return Path.home() / ".local" / "share" / "llmcore-team"


@dataclass(frozen=True)
class Hub:
    """The hub's address (what clients connect to), its bind address, ports and state folder."""

    host: str
    state: Path
    bind: str = ""
    ports: dict[str, int] = field(default_factory=lambda: dict(PORTS))
    ssh_user: str = field(default_factory=getpass.getuser)

    @property
    def listen(self) -> str:
        return self.bind or self.host

    def path(self, *parts: str) -> Path:
        return self.state.joinpath(*parts)

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports['mlflow']}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.ports['prefect']}/api"

    def ssh_url(self, *parts: str) -> str:
        return f"ssh://{self.ssh_user}@{self.host}:{self.ports['ssh']}{self.path(*parts)}"

    @property
    def git_url(self) -> str:
        return self.ssh_url("git", "llmcore.git")

    @property
    def dvc_url(self) -> str:
        return self.ssh_url("dvc-remote")

    def save(self) -> None:
        data = {"host": self.host, "bind": self.bind, "ports": self.ports,
                "ssh_user": self.ssh_user}
        self.path("hub.json").write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, state: Path) -> Hub:
        try:
            data = json.loads((state / "hub.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"no hub in {state} ({exc}); start one with "
                             "`python -m pipeline.team up --host ADDRESS`") from exc
        return cls(host=data["host"], state=state, bind=data.get("bind", ""),
                   ports={**PORTS, **data.get("ports", {})},
                   ssh_user=data.get("ssh_user") or getpass.getuser())


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def load_secrets(hub: Hub) -> dict[str, str]:
    """The hub's secrets: made on first use, the same on every later ``up``."""
    path = hub.path("secrets.json")
    found: dict[str, str] = {}
    if path.exists():
        found = json.loads(path.read_text())
    missing = [n for n in SECRET_NAMES if not found.get(n)]
    if missing:
        found.update({n: secrets.token_urlsafe(24) for n in missing})
        write_private(path, json.dumps(found, indent=1) + "\n")
    return found


def client_env(hub: Hub, sec: dict[str, str]) -> dict[str, str]:
    """What a checkout sets to use the hub (written to ``client.env``; docs/teams.md)."""
    return {
        "MLFLOW_TRACKING_URI": hub.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
        "MLFLOW_TRACKING_PASSWORD": sec["mlflow_team"],
        **MLFLOW_CLIENT_LIMITS,
        "PREFECT_API_URL": hub.prefect_api,
        "PREFECT_API_AUTH_STRING": f"admin:{sec['prefect_auth']}",
        "LLMCORE_TEAM_GIT": hub.git_url,
        "LLMCORE_TEAM_DVC": hub.dvc_url,
    }


def write_env_file(path: Path, values: dict[str, str]) -> None:
    # quoted for the shell: `set -a; . ./team.env; set +a` loads it (docs/teams.md)
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    write_private(path, "# llmcore team: the hub's addresses and credentials (keep private)\n"
                  + "\n".join(lines) + "\n")


ENV_FILE = "team.env"  # a checkout's copy of the hub's client.env (git-ignored)


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SystemExit(f"{path}: line {line!r} is not KEY=VALUE")
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise SystemExit(f"{path}: the value of {key.strip()} is not closed ({exc})") from exc
        out[key.strip()] = " ".join(parts)
    return out


def team_values(checkout: Path) -> dict[str, str]:
    """The checkout's ``team.env`` (or the file ``LLMCORE_TEAM_ENV`` names)."""
    path = Path(os.environ.get("LLMCORE_TEAM_ENV") or checkout / ENV_FILE)
    if not path.exists():
        raise SystemExit(f"{path} is missing: copy the hub's client.env there and run "
                         "`python -m pipeline.team connect --env FILE`")
    return read_env_file(path)


def load_team_env(checkout: Path) -> dict[str, str]:
    """The checkout's ``team.env`` merged into ``os.environ`` (set variables win)."""
    values = team_values(checkout)
    for key, value in values.items():
        os.environ.setdefault(key, value)
    return values
