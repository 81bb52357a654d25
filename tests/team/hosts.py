"""Three hosts on one machine: network namespaces ``hub``, ``gpu-box`` and ``laptop`` on one
segment (a bridge inside the hub, a veth link to each of the others), the way a small team's
machines share a switch. The namespaces share the filesystem; each host gets its own HOME
(its own SSH key, known_hosts and ssh config) and its own host name (a UTS namespace)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

HOSTS = ("hub", "gpu-box", "laptop")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class Lan:
    def __init__(self, base: Path) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(10)}"
        self.base = base
        self.ns = {h: f"lt{tag}{h[0]}" for h in HOSTS}
        net = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
        self.addr = {"hub": f"{net}.1", "gpu-box": f"{net}.2", "laptop": f"{net}.3"}
        self.bridge = f"lt{tag}br"

    def up(self) -> str | None:
        """Make the three hosts; the reason when this machine cannot."""
        for host in HOSTS:
            r = _ip("netns", "add", self.ns[host])
            if r.returncode:
                return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
            (self.base / "home" / host / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        hub = self.ns["hub"]
        steps = [("-n", hub, "link", "add", self.bridge, "type", "bridge"),
                 ("-n", hub, "addr", "add", f"{self.addr['hub']}/24", "dev", self.bridge),
                 ("-n", hub, "link", "set", self.bridge, "up")]
        for host in HOSTS[1:]:
            a, b = f"{self.bridge}{host[0]}h", f"{self.bridge}{host[0]}c"
            steps += [("link", "add", a, "type", "veth", "peer", "name", b),
                      ("link", "set", a, "netns", hub),
                      ("-n", hub, "link", "set", a, "master", self.bridge),
                      ("-n", hub, "link", "set", a, "up"),
                      ("link", "set", b, "netns", self.ns[host]),
                      ("-n", self.ns[host], "addr", "add", f"{self.addr[host]}/24", "dev", b),
                      ("-n", self.ns[host], "link", "set", b, "up")]
        steps += [("-n", self.ns[h], "link", "set", "lo", "up") for h in HOSTS]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                return f"`ip {' '.join(step)}` failed: {r.stderr.strip()}"
        return None

    def home(self, host: str) -> Path:
        return self.base / "home" / host

    def cmd(self, host: str, *args: str) -> list[str]:
        """``args`` run on ``host``: its network, its host name, its HOME."""
        script = f'hostname {host} && export HOME={self.home(host)} && exec "$@"'
        return ["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "sh", "-c", script,
                "sh", *args]

    def python(self, host: str, *args: str) -> list[str]:
        return self.cmd(host, sys.executable, *args)

    def down(self) -> None:
        """Kill every process left in the namespaces, then delete them (veths go with them)."""
        for host in HOSTS:
            pids = _ip("netns", "pids", self.ns[host]).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for host in HOSTS:
            _ip("netns", "del", self.ns[host])
