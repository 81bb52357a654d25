"""The team mode's parts that need no server: secrets and the client file, the SSH entries a
checkout gets, what a worker's run decides on its own, and how a dead tracking server is told."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from pipeline.team import client
from pipeline.team.flow import last_line, made_here_unpushed, unpushed_marker
from pipeline.team.settings import (
    SECRET_NAMES,
    Hub,
    client_env,
    load_secrets,
    read_env_file,
    write_env_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_made_once_private_and_kept(tmp_path):
    hub = Hub(host="10.0.0.5", state=tmp_path)
    first = load_secrets(hub)
    assert set(first) == set(SECRET_NAMES) and len(set(first.values())) == len(SECRET_NAMES)
    assert mode(tmp_path / "secrets.json") == 0o600
    assert load_secrets(hub) == first  # a later `up` uses the same ones


def test_client_file_round_trips_values_with_spaces_and_stays_private(tmp_path):
    hub = Hub(host="10.0.0.5", state=tmp_path, ssh_user="ops")
    env = client_env(hub, load_secrets(hub))
    env["LLMCORE_TEAM_HOST_KEY"] = "ssh-ed25519 AAAAC3Nza llmcore-hub"
    path = tmp_path / "client.env"
    write_env_file(path, env)
    assert mode(path) == 0o600
    assert read_env_file(path) == env
    assert env["LLMCORE_TEAM_GIT"] == f"ssh://ops@10.0.0.5:2222{tmp_path}/git/llmcore.git"
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    # the file is also what a shell sources (docs/teams.md)
    import subprocess

    out = subprocess.run(["sh", "-c", f"set -a; . {path}; printf %s \"$LLMCORE_TEAM_HOST_KEY\""],
                         capture_output=True, text=True)
    assert out.stdout == env["LLMCORE_TEAM_HOST_KEY"], out.stderr


def test_a_hub_without_state_says_how_to_start_one(tmp_path):
    with pytest.raises(SystemExit, match="python -m pipeline.team up --host"):
        Hub.load(tmp_path)


def test_ssh_entries_pin_the_host_and_name_only_options_dvc_reads(tmp_path, monkeypatch):
    from scmrepo.git.backend.dulwich.asyncssh_vendor import get_unsupported_opts

    monkeypatch.setenv("HOME", str(tmp_path))
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    (ssh / "config").write_text("Host other\n  User me\n")
    (ssh / "known_hosts").write_text("[10.0.0.5]:2222 ssh-ed25519 OLDKEY\nother ssh-rsa X\n")
    url = "ssh://root@10.0.0.5:2222/srv/git/llmcore.git"
    key = tmp_path / "id"
    for _ in range(2):  # connecting again replaces the entries, never duplicates them
        client.pin_host_key(url, "ssh-ed25519 NEWKEY llmcore-hub")
        client.ssh_config_entry(url, key)
    known = (ssh / "known_hosts").read_text().splitlines()
    assert "[10.0.0.5]:2222 ssh-ed25519 NEWKEY" in known and "other ssh-rsa X" in known
    assert not any("OLDKEY" in ln for ln in known)
    config = (ssh / "config").read_text()
    assert config.startswith("Host other\n") and config.count("Host 10.0.0.5") == 1
    assert f"IdentityFile {key}" in config and "Port 2222" in config
    # an option DVC's SSH client does not know would send its git to plain OpenSSH, which
    # does not read this block's key
    assert list(get_unsupported_opts([ssh / "config"])) == []


def test_last_line_names_dvcs_error_not_its_footer():
    tail = ("Pushing git refs\nERROR: unexpected error - Connection refused\n\n"
            "Having any troubles? Hit us up at https://dvc.org/support\n")
    assert last_line(tail) == "ERROR: unexpected error - Connection refused"
    assert last_line("just this\n") == "just this"
    assert last_line("") == "(no output)"


def test_an_unpushed_experiment_is_pushed_only_for_the_same_request(tmp_path):
    request = {"commit": "abc", "stages": ["pretrain"], "overrides": {"pretrain.lr": 0.002}}
    assert not made_here_unpushed(tmp_path, "lr", request)
    marker = unpushed_marker(tmp_path, "lr")
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps(request))
    assert made_here_unpushed(tmp_path, "lr", request)
    assert not made_here_unpushed(tmp_path, "lr", {**request, "commit": "def"})
    assert not made_here_unpushed(tmp_path, "lr", {**request, "overrides": None})
    marker.write_text("{not json")
    assert not made_here_unpushed(tmp_path, "lr", request)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down_is_told_apart(monkeypatch):
    from mlflow import MlflowClient

    from llmcore.tracking import is_server, unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert is_server(uri) and not is_server("sqlite:////tmp/mlflow.db")
    with pytest.raises(Exception) as info:
        MlflowClient(uri).search_experiments()
    why = unreachable(info.value)
    assert why is not None and "\n" not in why
    assert unreachable(ValueError("bad value")) is None
    # a refused connection of something else (a rendezvous) is not the tracking server's
    assert unreachable(RuntimeError("connect(): Connection refused")) is None


def test_worker_environment_names_the_checkout_and_heartbeats(tmp_path, monkeypatch):
    (tmp_path / "team.env").write_text("PREFECT_API_URL=http://10.0.0.5:4200/api\n")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    env = client.worker_env(tmp_path)
    assert env["LLMCORE_WORKER_CHECKOUT"] == str(tmp_path)
    assert env["PREFECT_API_URL"] == "http://10.0.0.5:4200/api"
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum
    assert os.path.dirname(os.sys.executable) in env["PATH"].split(os.pathsep)[0]


def test_a_run_refuses_a_checkout_that_is_not_at_its_commit(tmp_path):
    import subprocess

    from pipeline.team.flow import TeamRunError, sync_checkout

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    shas = []
    for n in range(2):
        (tmp_path / "f").write_text(str(n))
        subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
        subprocess.run(["git", "commit", "-qm", str(n)], cwd=tmp_path, check=True, env=env)
        shas.append(subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True,
                                   capture_output=True, text=True).stdout.strip())
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        assert sync_checkout.fn(str(tmp_path), shas[1][:8]) == shas[1]
        with pytest.raises(TeamRunError, match="not at"):
            sync_checkout.fn(str(tmp_path), shas[0])  # known, but not checked out
        with pytest.raises(TeamRunError, match="not at"):
            sync_checkout.fn(str(tmp_path), "f" * 40)  # unknown
    with pytest.raises(TeamRunError, match="not a git checkout"):
        sync_checkout.fn(str(tmp_path / "nowhere"), shas[1])
