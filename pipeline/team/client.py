"""A checkout pointed at the hub, by configuration only; a worker; a triggered run.

``connect`` writes nothing that is committed: ``team.env`` (git-ignored, 0600), the git
remote ``team`` with this host's key (``core.sshCommand`` in ``.git/config``), the DVC remote
``team`` as the default in ``.dvc/config.local``, and the hub's host key in
``~/.ssh/known_hosts`` (pinned: neither git nor DVC accepts another key for that address).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.team.settings import (
    DEPLOYMENT,
    ENV_FILE,
    HEARTBEAT_S,
    POOL,
    REMOTE,
    load_team_env,
    read_env_file,
    team_values,
    write_private,
)

SSH_TIMEOUT_S = 15  # a hub that does not answer fails git and DVC in seconds, not minutes


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ))
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:4])}: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout.strip()


def ssh_command(key: Path) -> str:
    # known_hosts named: OpenSSH looks in the passwd entry's home, DVC's SSH client in $HOME
    known = Path.home() / ".ssh" / "known_hosts"
    return (f"ssh -i {key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={known} -o ConnectTimeout={SSH_TIMEOUT_S}")


def pin_host_key(url: str, host_key: str) -> None:
    """``[host]:port KEY`` in ~/.ssh/known_hosts (what OpenSSH and asyncssh both read)."""
    host, port = hub_address(url)
    entry = f"[{host}]:{port} {' '.join(host_key.split()[:2])}"
    known = Path.home() / ".ssh" / "known_hosts"
    known.parent.mkdir(mode=0o700, exist_ok=True)
    lines = known.read_text().splitlines() if known.exists() else []
    lines = [ln for ln in lines if not ln.startswith(f"[{host}]:{port} ")]
    write_private(known, "\n".join([*lines, entry]) + "\n")


def hub_address(url: str) -> tuple[str, str]:
    host, _, port = url.split("@", 1)[1].split("/", 1)[0].partition(":")
    return host, port or "22"


def ssh_config_entry(url: str, key: Path) -> None:
    """This host's key for the hub in ~/.ssh/config: git, DVC's SSH remote and DVC's own git
    client (``dvc exp push``) all read it, where only git reads ``core.sshCommand``."""
    host, port = hub_address(url)
    begin, end = f"# >>> llmcore team hub {host}:{port}", f"# <<< llmcore team hub {host}:{port}"
    path = Path.home() / ".ssh" / "config"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if begin in text:  # replace this hub's block, keep everything else
        head, _, rest = text.partition(begin)
        text = head + rest.partition(end)[2].lstrip("\n")
    # only options DVC's SSH client (asyncssh) knows: with any other, DVC's git falls back to
    # plain OpenSSH without this block's key (an unknown host key is refused either way)
    known = path.parent / "known_hosts"
    block = (f"{begin}\nHost {host}\n  Port {port}\n  IdentityFile {key}\n"
             f"  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n"
             f"  ConnectTimeout {SSH_TIMEOUT_S}\n{end}\n")
    write_private(path, (text.rstrip("\n") + "\n\n" if text.strip() else "") + block)


def connect(checkout: Path, env_file: Path, key: Path) -> dict[str, str]:
    """Point ``checkout`` at the hub described by ``env_file`` (the hub's client.env)."""
    checkout, key = checkout.resolve(), key.expanduser().resolve()
    if not key.exists():
        raise SystemExit(f"SSH key {key} not found: make one with `ssh-keygen -t ed25519 -f "
                         f"{key}` and have the hub authorize {key}.pub")
    values = read_env_file(env_file)
    if env_file.resolve() != (checkout / ENV_FILE).resolve():
        write_private(checkout / ENV_FILE, env_file.read_text())
    pin_host_key(values["LLMCORE_TEAM_GIT"], values["LLMCORE_TEAM_HOST_KEY"])
    ssh_config_entry(values["LLMCORE_TEAM_GIT"], key)
    remotes = _run(["git", "remote"], checkout).split()
    verb = "set-url" if REMOTE in remotes else "add"
    _run(["git", "remote", verb, REMOTE, values["LLMCORE_TEAM_GIT"]], checkout)
    _run(["git", "config", "core.sshCommand", ssh_command(key)], checkout)
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "remote", "add", "--local", "--force", "--default", REMOTE,
          values["LLMCORE_TEAM_DVC"]], checkout)
    _run([*dvc, "remote", "modify", "--local", REMOTE, "keyfile", str(key)], checkout)
    _run([*dvc, "remote", "modify", "--local", REMOTE, "timeout", str(SSH_TIMEOUT_S)], checkout)
    return values


def clone(url: str, dest: Path, key: Path, host_key: str) -> None:
    pin_host_key(url, host_key)
    env = {**os.environ, "GIT_SSH_COMMAND": ssh_command(key.expanduser().resolve())}
    _run(["git", "clone", "--quiet", url, str(dest)], dest.parent, env)
    _run(["git", "remote", "rename", "origin", REMOTE], dest)
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=dest,
                      capture_output=True).returncode:
        branches = _run(["git", "branch", "-r", "--format=%(refname:short)"], dest).split()
        if not branches:
            raise SystemExit(f"the team's git remote {url} has no commit yet: push one "
                             f"(`git push {REMOTE} HEAD:main`) and start the worker again")
        _run(["git", "checkout", "--quiet", "--detach", branches[0]], dest)


def worker_env(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(team_values(checkout))
    env.update(LLMCORE_WORKER_CHECKOUT=str(checkout), DO_NOT_TRACK="true",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    # `dvc exp save` commits: a host without a git identity gets one naming it
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env.setdefault(var, f"llmcore worker {socket.gethostname()}")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(var, f"llmcore@{socket.gethostname()}")
    return env


def worker(checkout: Path, env_file: Path, key: Path, name: str | None) -> None:
    """Clone (first time) and connect ``checkout``, then become ``prefect worker start``."""
    checkout = checkout.resolve()
    values = read_env_file(env_file)
    if not (checkout / ".git").exists():
        checkout.parent.mkdir(parents=True, exist_ok=True)
        clone(values["LLMCORE_TEAM_GIT"], checkout, key, values["LLMCORE_TEAM_HOST_KEY"])
    connect(checkout, env_file, key)
    env = worker_env(checkout)
    prefect = shutil.which("prefect", path=env["PATH"]) or "prefect"
    args = [prefect, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
            "--name", name or socket.gethostname()]
    os.chdir(checkout)
    os.execve(prefect, args, env)


def trigger(checkout: Path, commit: str, overrides: dict[str, Any], stages: list[str] | None,
            experiment: str | None, wait: bool) -> dict[str, Any]:
    """A run of the team deployment at ``commit`` (which must be on the team's git remote)."""
    checkout = checkout.resolve()
    load_team_env(checkout)
    full = _run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], checkout)
    _run(["git", "fetch", "--quiet", REMOTE], checkout)
    on_remote = _run(["git", "branch", "-r", "--contains", full], checkout)
    if not any(b.strip().startswith(f"{REMOTE}/") for b in on_remote.splitlines()):
        raise SystemExit(f"commit {full[:12]} is not on the team's git remote: "
                         f"`git push {REMOTE} HEAD` first (a worker runs only pushed commits)")
    from prefect.deployments import run_deployment

    params: dict[str, Any] = {"commit": full, "overrides": overrides or None,
                              "stages": stages, "experiment": experiment}
    # typed as a coroutine too (Prefect's sync/async dual API); called here, it runs at once
    run: Any = run_deployment(DEPLOYMENT, parameters=params, timeout=None if wait else 0)
    state = run.state.name if run.state else "?"
    return {"flow_run_id": str(run.id), "flow_run": run.name, "state": state,
            "commit": full, "experiment": experiment}
