"""The DVC experiment queue as :mod:`pipeline.compare` drives it: queue runs, wait for them
with a line of progress, read their metrics.

Every run is ``dvc exp run --queue -n NAME -S ...``, run by ``dvc queue start`` workers; a
name must be new (:func:`taken`), since the figures are read back by name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DONE = ("Success", "Failed")


# DVC's queue starts its workers as `dvc` found on PATH: the one beside this Python first
ENV = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                              os.environ.get("PATH", "")])}


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True, env=ENV)
    if check and proc.returncode != 0:
        raise SystemExit(f"compare: dvc {' '.join(args)} failed:\n{proc.stderr.strip()[-2000:]}")
    return proc


def queue(runs: list[tuple[str, int, list[str]]], target: str) -> None:
    for name, _, overrides in runs:
        sets = [a for o in overrides for a in ("-S", o)]
        dvc("exp", "run", "--queue", "-n", name, *sets, target)
        print(f"compare: queued {name}", flush=True)


def taken(names: set[str]) -> list[str]:
    """Those of ``names`` that an experiment or an entry of the queue's history already has:
    the figures read after the run would be theirs as well (an earlier run of the same
    comparison, or a queue that still holds its entries)."""
    listed = dvc("exp", "list", "--all-commits", "--name-only", check=False).stdout.split()
    return sorted((set(listed) | set(statuses(names)[0])) & names)


def statuses(names: set[str]) -> tuple[dict[str, str], int | None]:
    """Our experiments' state in ``dvc queue status`` (Queued, Running, Success, Failed), and
    how many workers are active (None if the line is missing)."""
    out, active = {}, None
    for line in dvc("queue", "status", check=False).stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[1] in names:
            out[cols[1]] = cols[-1]
        found = re.search(r"Worker status: (\d+) active", line)
        if found:
            active = int(found.group(1))
    return out, active


def start_workers(jobs: int) -> None:
    # the queue's workers are daemons that would inherit a captured pipe, and a wait for its
    # end would last as long as they do: their output goes to DVC's own logs instead
    started = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=ROOT, env=ENV,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    if started.returncode != 0:
        raise SystemExit("compare: `dvc queue start` failed; run it by hand to see why")


def wait(names: set[str], jobs: int, poll: float = 10.0) -> dict[str, str]:
    """Start the queue's workers and wait for every one of ``names`` to finish, with a line
    of progress (done, failed, rate, ETA) whenever a run ends."""
    start_workers(jobs)
    start, reported = time.time(), -1
    try:
        idle = 0
        while True:
            state, active = statuses(names)
            # a worker can stop between tasks (a shutdown left in the queue's broker by an
            # earlier `dvc queue stop` reaches the next worker): start another
            idle = idle + 1 if active == 0 and "Queued" in state.values() else 0
            if idle >= 3:
                print("compare: no queue worker is running; starting one", flush=True)
                start_workers(jobs)
                idle = 0
            done = [n for n, s in state.items() if s in DONE]
            if len(done) != reported:
                reported = len(done)
                elapsed = time.time() - start
                eta = (elapsed / len(done) * (len(names) - len(done))) if done else None
                failed = sum(state[n] == "Failed" for n in done)
                print(f"compare: {len(done)}/{len(names)} done ({failed} failed), "
                      f"{elapsed / 60:.1f} min"
                      + (f", eta {eta / 60:.1f} min" if eta is not None else ""), flush=True)
            if len(done) == len(names):
                return state
            if not any(s in ("Queued", "Running") for s in state.values()) and \
                    len(state) < len(names):
                missing = sorted(names - set(state))
                raise SystemExit(f"compare: {', '.join(missing)} left the queue unfinished "
                                 "(see `dvc queue status`)")
            time.sleep(poll)
    except KeyboardInterrupt:
        dvc("queue", "kill", *[n for n, s in statuses(names)[0].items() if s == "Running"],
            check=False)
        raise SystemExit("compare: stopped; the finished experiments stay (`dvc exp show`), "
                         "rerun with --report-only to compare them") from None


def collect(names: set[str]) -> dict[str, dict[str, Any]]:
    """name -> flat metrics (every metrics file merged) of the experiments in ``names``:
    those of the current commit, and of every commit when some are missing (experiments
    queued before a later commit belong to the commit they started from)."""
    found = experiment_metrics(names, json.loads(dvc("exp", "show", "--json").stdout or "[]"))
    if len(found) < len(names):
        show = json.loads(dvc("exp", "show", "--json", "--all-commits").stdout or "[]")
        found.update(experiment_metrics(names - set(found), show))
    return found


def experiment_metrics(names: set[str], show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> flat metrics of the finished experiments in ``names`` found in ``show`` (the
    parsed output of ``dvc exp show --json``). A queued, running, failed or killed one is
    left out: DVC lists it with the metrics files of the commit it started from, which are
    another run's."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("queued", "running", "failed"):
                continue
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                if name in names and rev.get("data") and not rev.get("error"):
                    metrics: dict[str, Any] = {}
                    for f in (rev["data"].get("metrics") or {}).values():
                        metrics.update(f.get("data") or {})
                    found[name] = metrics
    return found
