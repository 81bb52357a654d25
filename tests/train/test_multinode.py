"""Two nodes across a real network hop: two network namespaces joined by a veth pair stand in
for two machines, each running ``torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d``.

The two-node run must equal a one-node, two-process run of the same global batch (losses and
final weights); a trainer killed on one node must make both nodes exit, with a message,
within a bounded time; and the same commands started again resume from the last checkpoint.
The namespaces share this machine's filesystem, as two machines would share ``data/`` over a
network filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_tree, project_env, run_group

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dist_fit.py"
STEPS, EVERY = 12, 4
EXIT_BOUND_S = 60  # both nodes gone this long after the kill (dist_timeout is 30 s)

pytestmark = pytest.mark.slow


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class TwoHosts:
    """Namespaces ``a`` and ``b`` with addresses ``addr_a`` and ``addr_b`` on one veth link."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.ns = {"a": f"llmc{tag}a", "b": f"llmc{tag}b"}
        self.dev = {"a": f"lc{tag}a", "b": f"lc{tag}b"}
        net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.addr = {"a": f"{net}.1", "b": f"{net}.2"}

    def up(self) -> str | None:
        """Make both hosts; the reason when this machine cannot."""
        for side in "ab":
            r = _ip("netns", "add", self.ns[side])
            if r.returncode:
                return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
        steps = [("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])]
        for side in "ab":
            steps += [("link", "set", self.dev[side], "netns", self.ns[side]),
                      ("-n", self.ns[side], "addr", "add", f"{self.addr[side]}/24", "dev",
                       self.dev[side]),
                      ("-n", self.ns[side], "link", "set", self.dev[side], "up"),
                      ("-n", self.ns[side], "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                return f"`ip {' '.join(step)}` failed: {r.stderr.strip()}"
        return None

    def down(self) -> None:
        for side in "ab":
            _ip("netns", "del", self.ns[side])  # takes its end of the veth pair with it

    def torchrun(self, side: str, port: int, run_id: str, *args: str) -> list[str]:
        """The command one node runs: torchrun with a c10d rendezvous hosted on node a."""
        return ["ip", "netns", "exec", self.ns[side], "env", f"GLOO_SOCKET_IFNAME={self.dev[side]}",
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{self.addr['a']}:{port}", "--rdzv_id", run_id,
                # the namespaces share one hostname, which resolves to neither of them: say
                # which node hosts the store, and the address the other ranks reach each at
                "--rdzv_conf", f"is_host={1 if side == 'a' else 0}",
                "--local_addr", self.addr[side],
                "--max_restarts", "0", *args]


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    h = TwoHosts()
    problem = h.up()
    if problem:
        h.down()
        pytest.skip(f"cannot make two network namespaces here: {problem}")
    yield h
    h.down()


@pytest.fixture(scope="module")
def data(tiny_shards, tmp_path_factory):
    shard_dir, tok = tiny_shards
    out = tmp_path_factory.mktemp("multinode") / "shards"
    shutil.copytree(shard_dir, out)
    tok.save(out / "tok")
    return out


def env() -> dict[str, str]:
    e = project_env()
    e["OMP_NUM_THREADS"] = "1"
    return e


def fit_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [str(SCRIPT), str(shards), str(out), "--steps", str(STEPS), "--batch", "4",
            "--checkpoint-every", str(EVERY), "--optimizer", "muon", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, tuple[int, str]]:
    out = {}
    try:
        for side, p in procs.items():
            text, _ = p.communicate(timeout=timeout)
            out[side] = (p.returncode, text)
    finally:
        for p in procs.values():
            kill_tree(p.pid)
    return out


def two_nodes(hosts: TwoHosts, args: list[str], timeout: float = 240
              ) -> dict[str, tuple[int, str]]:
    port, run_id = random.randrange(20000, 40000), f"t{random.randrange(10**6)}"
    procs = {side: start(hosts.torchrun(side, port, run_id, *args)) for side in "ab"}
    return finish(procs, timeout)


@pytest.fixture(scope="module")
def one_node(data):
    """The reference: one node, two processes, the same global batch (2 x 4 rows)."""
    out = data.parent / "one-node"
    one = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", *fit_args(data, out)], 300, env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())["losses"], load_file(
        str(out.with_suffix(".safetensors")))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_equal_one_node_with_two_processes(hosts, data, one_node):
    out = data.parent / "two-nodes"
    done = two_nodes(hosts, fit_args(data, out))
    for side, (code, text) in done.items():
        assert code == 0, f"node {side}:\n{text[-3000:]}"
    losses = json.loads(out.with_suffix(".json").read_text())["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert losses == one_node[0]  # the same two gradients summed, over veth, not loopback
    assert same_weights(load_file(str(out.with_suffix(".safetensors"))), one_node[1])


def _trainer_of(proc: subprocess.Popen) -> psutil.Process | None:
    """The training worker torchrun started inside one node."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if str(SCRIPT) in child.cmdline() and "torch.distributed.run" not in \
                        child.cmdline():
                    return child
    return None


def test_a_lost_node_stops_both_and_a_restart_resumes(hosts, data, one_node):
    root = data.parent
    out, ckpt = root / "lost", root / "ckpt-lost"
    args = fit_args(data, out, "--ckpt", str(ckpt), "--timeout", "30")
    port, run_id = random.randrange(20000, 40000), f"t{random.randrange(10**6)}"
    procs = {side: start(hosts.torchrun(side, port, run_id, *args, "--pause", "0.3"))
             for side in "ab"}
    try:
        deadline = time.monotonic() + 180
        while not list(ckpt.glob(f"*/step-{EVERY:08d}")):
            assert all(p.poll() is None for p in procs.values()), "a node ended early"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        victim = _trainer_of(procs["b"])
        assert victim is not None, "no trainer process found on node b"
        victim.send_signal(signal.SIGKILL)  # the trainer on node b dies (an OOM kill, a crash)
        killed = time.monotonic()
        done = finish(procs, EXIT_BOUND_S)
        took = time.monotonic() - killed
    finally:
        for p in procs.values():
            kill_tree(p.pid)
    assert took < EXIT_BOUND_S
    code_a, text_a = done["a"]
    code_b, text_b = done["b"]
    assert code_a != 0 and code_b != 0
    # node a: the surviving trainer says what happened and what to do
    assert "lost the other ranks" in text_a and "resume" in text_a, text_a[-8000:-2000]
    # node b: torchrun names its trainer's death
    assert "SIGKILL" in text_b or "Signal 9" in text_b, text_b[-3000:]
    assert not list(ckpt.glob(f"*/step-{STEPS:08d}"))
    said = next(line for line in text_a.splitlines() if "lost the other ranks" in line)
    print(f"both nodes exited {took:.1f} s after the kill; node a: {said}")

    again = two_nodes(hosts, args)
    for side, (code, text) in again.items():
        assert code == 0, f"node {side}:\n{text[-3000:]}"
    resumed = json.loads(out.with_suffix(".json").read_text())
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] >= EVERY
    assert resumed["losses"] == one_node[0]  # DDP's resume is exact
    assert same_weights(load_file(str(out.with_suffix(".safetensors"))), one_node[1])
