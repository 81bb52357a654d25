"""The hub's servers, one process each: start it detached, wait until it answers, stop it.

Every server is started in a session of its own with its output in ``<state>/logs/NAME.log``
and its pid in ``<state>/run/NAME.pid``, so ``down`` (or a test's clean-up) stops exactly what
``up`` started, and ``up`` run twice starts nothing twice. Passwords reach the servers through
their environment or a 0600 file, never their command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Mapping
from pathlib import Path

from pipeline.team.settings import Hub, write_private


class StackError(RuntimeError):
    """A server of the hub could not be started; the message names it and its log."""


def pid_file(hub: Hub, name: str) -> Path:
    return hub.path("run", f"{name}.pid")


def running_pid(hub: Hub, name: str) -> int | None:
    try:
        pid = int(pid_file(hub, name).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def spawn(hub: Hub, name: str, args: list[str], env: Mapping[str, str],
          user: str | None = None) -> int:
    """Start ``args`` detached (own session, output to its log), record its pid."""
    if (pid := running_pid(hub, name)) is not None:
        return pid
    log = hub.path("logs", f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file(hub, name).parent.mkdir(parents=True, exist_ok=True)
    if user:
        args = ["runuser", "-u", user, "--", *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file(hub, name).write_text(f"{proc.pid}\n")
    return proc.pid


def log_tail(hub: Hub, name: str, lines: int = 15) -> str:
    try:
        text = hub.path("logs", f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check, what: str, hub: Hub, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(hub, name) is None:
            raise StackError(f"{what} exited while starting; its log "
                             f"({hub.path('logs', name + '.log')}) ends:\n{log_tail(hub, name)}")
        time.sleep(0.5)
    raise StackError(f"{what} did not answer within {timeout:.0f}s; its log "
                     f"({hub.path('logs', name + '.log')}) ends:\n{log_tail(hub, name)}")


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def http_status(url: str, auth: tuple[str, str] | None = None, method: str = "GET",
                body: dict | None = None, timeout: float = 5) -> int | None:
    """The HTTP status ``url`` answers with (401 included); None when nothing answers."""
    req = urllib.request.Request(url, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


def stop(hub: Hub, name: str, timeout: float = 20) -> bool:
    """SIGTERM the server's process group, SIGKILL what is left after ``timeout``."""
    pid = running_pid(hub, name)
    if pid is None:
        pid_file(hub, name).unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(hub, name) is not None:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    pid_file(hub, name).unlink(missing_ok=True)
    return True


# --- PostgreSQL ------------------------------------------------------------------------------


def pg_bin(tool: str) -> str:
    """A PostgreSQL server program (Debian keeps them out of PATH, per major version)."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not versions:
        raise StackError(f"PostgreSQL's {tool} is not installed: `apt-get install postgresql` "
                         "(or run `make team-setup`)")
    return str(versions[-1])


def pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, the server runs as Debian's `postgres`."""
    return "postgres" if os.geteuid() == 0 else None


def start_postgres(hub: Hub, superuser_password: str) -> None:
    data, sock = hub.path("postgres"), hub.path("run", "pg")
    user = pg_user()
    sock.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(sock, user)
    if not (data / "PG_VERSION").exists():
        pwfile = hub.path("run", "pg-initpw")
        write_private(pwfile, superuser_password + "\n")
        if user:
            shutil.chown(pwfile, user)
            data.mkdir(parents=True, exist_ok=True)
            shutil.chown(data, user)
        # every connection, local socket included, needs a password (scram-sha-256)
        cmd = [pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
               f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        pwfile.unlink(missing_ok=True)
        if done.returncode:
            raise StackError(f"initdb failed: {done.stderr.strip()[-800:]}")
    if not port_open("127.0.0.1", hub.ports["postgres"]):
        log = hub.path("logs", "postgres.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        if user:
            log.touch()
            shutil.chown(log, user)
        # only the hub's own servers talk to PostgreSQL: it listens on loopback alone
        opts = f"-c listen_addresses=127.0.0.1 -p {hub.ports['postgres']} -k {sock}"
        cmd = [pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60",
               "start"]
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise StackError(f"PostgreSQL did not start: {done.stdout.strip()[-400:]}\n"
                             f"{log_tail(hub, 'postgres')}")


def stop_postgres(hub: Hub) -> bool:
    data = hub.path("postgres")
    if not (data / "postmaster.pid").exists():
        return False
    cmd = [pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    if user := pg_user():
        cmd = ["runuser", "-u", user, "--", *cmd]
    subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return True


def psql(hub: Hub, password: str, sql: str, db: str = "postgres") -> str:
    env = {**os.environ, "PGPASSWORD": password}
    done = subprocess.run(
        ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(hub.ports["postgres"]), "-U", "postgres", "-d", db, "-c", sql],
        env=env, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise StackError(f"psql on {db}: {done.stderr.strip()}")
    return done.stdout.strip()


def ensure_database(hub: Hub, su_password: str, name: str, owner: str,
                    owner_password: str) -> None:
    """Role ``owner`` (its password set every time, so a rotated secret takes effect) and
    database ``name`` it owns."""
    quoted = owner_password.replace("'", "''")
    exists = psql(hub, su_password, f"SELECT 1 FROM pg_roles WHERE rolname = '{owner}'")
    verb = "ALTER" if exists == "1" else "CREATE"
    psql(hub, su_password, f"{verb} ROLE {owner} LOGIN PASSWORD '{quoted}'")
    if psql(hub, su_password, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
        psql(hub, su_password, f"CREATE DATABASE {name} OWNER {owner}")


# --- sshd ------------------------------------------------------------------------------------


def start_sshd(hub: Hub, env: Mapping[str, str]) -> None:
    ssh = hub.path("ssh")
    ssh.mkdir(parents=True, exist_ok=True)
    host_key = ssh / "host_ed25519"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmcore-hub",
                        "-f", str(host_key)], check=True)
    keys = ssh / "authorized_keys"
    keys.touch(mode=0o600)
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                             "/usr/libexec/sftp-server") if Path(p).exists()), "internal-sftp")
    write_private(ssh / "sshd_config", "\n".join([
        f"Port {hub.ports['ssh']}", f"ListenAddress {hub.listen}", f"HostKey {host_key}",
        f"PidFile {hub.path('run', 'sshd.real.pid')}", f"AuthorizedKeysFile {keys}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "UsePAM no",
        "StrictModes no", "X11Forwarding no", "AllowTcpForwarding no",
        f"Subsystem sftp {sftp}", ""]))
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise StackError("sshd is not installed: `apt-get install openssh-server` "
                         "(or run `make team-setup`)")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder
    spawn(hub, "sshd", [sshd, "-D", "-e", "-f", str(ssh / "sshd_config")], env)
    wait_until(lambda: port_open(hub.host, hub.ports["ssh"]), "sshd", hub, "sshd", 20)


def authorize_key(hub: Hub, public_key: str) -> bool:
    """Add a host's public key to the hub's SSH server (git and the DVC remote)."""
    keys = hub.path("ssh", "authorized_keys")
    line = public_key.strip()
    if not line.startswith(("ssh-", "ecdsa-")):
        raise SystemExit("that is not an OpenSSH public key (expected 'ssh-ed25519 AAAA...')")
    have = keys.read_text().splitlines() if keys.exists() else []
    if line in have:
        return False
    write_private(keys, "\n".join([*have, line]) + "\n")
    return True


def python_bin() -> str:
    return sys.executable
