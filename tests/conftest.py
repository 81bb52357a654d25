from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmcore.data.tokenizer import LLMTokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# base.dtype auto means float32 on every CPU here (not a per-machine measurement), so that a
# test's numbers do not depend on the machine it runs on; tests of the measurement unset it
os.environ.setdefault("LLMCORE_AUTO_DTYPE", "float32")

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
    "A list is a mutable sequence. A tuple is an immutable sequence.",
    "中文文本和表情符号 🎉 should round-trip exactly.",
    "Numbers like 12345 and 3.14159 are split into single digits.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer() -> LLMTokenizer:
    return LLMTokenizer(train_bpe(SAMPLE_TEXTS, vocab_size=300, min_frequency=1))


def project_env() -> dict[str, str]:
    """Environment for subprocesses: the venv's bin first on PATH, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("DVC_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_group(cmd: list[str], timeout: float, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; on a timeout (or any interruption) the whole
    process group is killed (the stages DVC started, torchrun's workers), not only ``cmd``."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env if env is not None else project_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant. torchrun starts each worker in a
    session of its own, so killing its group alone would leave the workers running."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def copy_project(dest: Path) -> Path:
    """The repository's working files (tracked and untracked, not ignored) in a new git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    env = project_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Shards of a small slice of the builtin corpus, seq_len 32, vocab 300."""
    from llmcore.data.packing import pack_all
    from llmcore.data.pydocs import builtin_documents
    from llmcore.data.tasks import synthetic_conversations

    docs = [d.text for _, d in zip(range(40), builtin_documents(), strict=False)]
    convs = [c.as_dicts() for c in synthetic_conversations(40, seed=0)]
    tok = LLMTokenizer(train_bpe(docs, vocab_size=300, min_frequency=2))
    out = tmp_path_factory.mktemp("shards")
    pack_all(tok, {"train": docs[4:], "val": docs[:4]}, {"train": convs[16:], "val": convs[:16]},
             out, seq_len=32, rows_per_shard=256)
    return out, tok
