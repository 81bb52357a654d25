"""Files that are either whole or absent: atomic writes, leftovers of killed runs, hashes.

Every output of the pipeline (corpus, shards, checkpoints, model directories, metrics JSON) is
written into a hidden temporary sibling (``.<name>.tmp-XXXX``), fsynced, and renamed into
place, so a crash at any moment leaves either the old version or the new one, never half of
one. A process killed mid-write (``kill -9``, power loss) cannot clean up after itself, so the
next writer of the same path removes those hidden leftovers first (:func:`remove_leftovers`).

Trade-off: an output is written in full before the old one goes, so for a moment both are on
disk; corpus and shards are small next to the disk, and nothing is ever half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TMP, OLD = ".tmp-", ".old-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for f in Path(path).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def remove_leftovers(final: Path, name: str | None = None) -> list[Path]:
    """Delete hidden temporaries that a killed writer of ``final`` left beside it.

    ``name`` widens the match (``"*"``: the leftovers of every output in that folder).
    Returns what was removed.
    """
    final = Path(final)
    stem = name or final.name
    removed = []
    if final.parent.is_dir():
        for marker in (TMP, OLD):
            for path in final.parent.glob(f".{stem}{marker}*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_dir(final: Path, fill: Callable[[Path], T]) -> T:
    """Create directory ``final`` by ``fill(tmp)`` on a temporary sibling, then a rename.

    Returns what ``fill`` returns. On any error the temporary is removed and ``final`` is left
    as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP}", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are read by other users' tools too
        result = fill(tmp)
        fsync_tree(tmp)
        old = None
        if final.exists():
            # two renames, not rmtree + rename: the old version stays whole until the new
            # one is in place
            old = final.with_name(f".{final.name}{OLD}{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(dict(data), indent=2, sort_keys=True, default=str) + "\n")
