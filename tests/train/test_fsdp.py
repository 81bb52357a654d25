"""FSDP2 (``parallel: fsdp``) on CPU with gloo, 2 processes, tiny model: it follows DDP,
resumes bit-exactly after a kill -9, and its checkpoints resume at another world size."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_tree, project_env, run_group

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dist_fit.py"
STEPS, EVERY = 12, 4
# FSDP reduce-scatters what DDP all-reduces: with 2 ranks both add the same two numbers, so
# the curves agree to the last bit here; the tolerance allows another summation order
# (other world sizes, other backends), which differs by rounding only
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6

pytestmark = pytest.mark.slow  # torchrun: two processes and a rendezvous


def env() -> dict[str, str]:
    e = project_env()
    e["OMP_NUM_THREADS"] = "1"
    return e


def cmd(nproc: int, shards: Path, out: Path, *args: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return [*launcher, str(SCRIPT), str(shards), str(out), "--steps", str(STEPS),
            "--checkpoint-every", str(EVERY), "--optimizer", "muon", *args]


def run(c: list[str]) -> dict:
    done = run_group(c, 300, env=env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(Path(c[c.index(str(SCRIPT)) + 2]).with_suffix(".json").read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out.with_suffix(".safetensors")))


def kill_after_checkpoint(c: list[str], ckpt: Path, step: int) -> None:
    """Start ``c``; kill -9 its whole process group once checkpoint ``step`` is in place."""
    proc = subprocess.Popen(c, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list(ckpt.glob(f"*/step-{step:08d}")):
            assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)  # torchrun and its workers (each in a session of its own)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(ckpt.glob(f"*/step-{STEPS:08d}")), "the run finished before the kill"


@pytest.fixture(scope="module")
def data(tiny_shards, tmp_path_factory):
    shard_dir, tok = tiny_shards
    out = tmp_path_factory.mktemp("fsdp") / "shards"
    shutil.copytree(shard_dir, out)
    tok.save(out / "tok")
    return out


@pytest.fixture(scope="module")
def uninterrupted(data):
    """The 2-process FSDP and DDP runs every other test compares with."""
    root = data.parent
    fsdp = run(cmd(2, data, root / "fsdp", "--parallel", "fsdp", "--val", "--eval-every", "6"))
    ddp = run(cmd(2, data, root / "ddp", "--parallel", "ddp", "--val", "--eval-every", "6"))
    return root, fsdp, ddp


def test_fsdp_follows_ddp_and_exports_the_same_format(uninterrupted):
    root, fsdp, ddp = uninterrupted
    assert len(fsdp["losses"]) == len(ddp["losses"]) == STEPS
    assert fsdp["losses"][-1] < fsdp["losses"][0]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=LOSS_RTOL)
    assert [e["val_loss"] for e in fsdp["evals"]] == pytest.approx(
        [e["val_loss"] for e in ddp["evals"]], rel=LOSS_RTOL)
    a, b = weights(root / "fsdp"), weights(root / "ddp")
    # the model directory's weights: same names, shapes and dtypes (tied head stored once)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == \
        {k: (v.shape, v.dtype) for k, v in b.items()}
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=WEIGHT_ATOL, rtol=0)
    # checkpoints are sharded: one DCP file per rank, and each rank's RNG
    step = next((root / "ckpt-fsdp").glob(f"*/step-{STEPS:08d}"))
    assert sorted(p.name for p in (step / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                      "__1_0.distcp"]
    assert (step / "dcp" / ".metadata").is_file()
    assert (step / "rng-00000.pt").is_file() and (step / "rng-00001.pt").is_file()
    assert len(list(step.parent.glob("step-*"))) == 2  # keep_checkpoints: older ones pruned


def test_fsdp_killed_and_resumed_is_bit_identical(uninterrupted):
    root, fsdp, _ = uninterrupted
    out, ckpt = root / "killed", root / "ckpt-killed"
    c = cmd(2, root / "shards", out, "--parallel", "fsdp", "--val", "--eval-every", "6",
            "--ckpt", str(ckpt))
    kill_after_checkpoint([*c, "--pause", "0.4"], ckpt, EVERY)
    resumed = run(c)
    assert resumed["resumed_from"] == EVERY
    assert resumed["losses"] == fsdp["losses"]  # exact: same ranks, same order of sums
    a, b = weights(out), weights(root / "fsdp")
    assert all(torch.equal(a[k], b[k]) for k in b)


def resume_copy(src: Path, dst: Path, step: int) -> None:
    """A checkpoint folder as a run killed after checkpoint ``step`` leaves it."""
    shutil.copytree(src, dst)
    for later in dst.glob("*/step-*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_at_another_world_size(uninterrupted, before, after):
    """Same global batch (2 x 4 rows or 1 x 8): the next step's loss matches the
    uninterrupted 2-process run's within the tolerance."""
    root, fsdp, _ = uninterrupted
    out, ckpt = root / f"world-{before}-{after}", root / f"ckpt-{before}-{after}"

    def c(n: int, where: Path = ckpt) -> list[str]:
        return cmd(n, root / "shards", out, "--parallel", "fsdp", "--val", "--eval-every", "6",
                   "--ckpt", str(where), "--batch", str(8 // n))

    if before == 2:  # the uninterrupted 2-process run's checkpoints, cut back to step 8
        source = root / "ckpt-fsdp"
    else:
        source = root / "ckpt-one"
        run(c(1, source))
    resume_copy(source, ckpt, 2 * EVERY)
    resumed = run(c(after))
    assert resumed["resumed_from"] == 2 * EVERY
    # the history it resumed (made by `before` processes)
    assert resumed["losses"][:8] == pytest.approx(fsdp["losses"][:8], rel=LOSS_RTOL)
    assert resumed["losses"][8] == pytest.approx(fsdp["losses"][8], rel=LOSS_RTOL)
    assert resumed["losses"] == pytest.approx(fsdp["losses"], rel=1e-4)
