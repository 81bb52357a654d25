"""Training checkpoints with exact resume.

A checkpoint is a directory ``step-00000100/`` holding

  * ``model.safetensors``: the weights;
  * ``optimizer.pt``: the optimizer state (tensors and numbers only);
  * ``rng.pt``: torch (CPU and CUDA), NumPy and Python RNG states, as tensors;
  * ``state.json``: step, data loader position, best validation so far, log history, and the
    fingerprint of everything that shapes the run;
  * ``checksums.json``: SHA-256 of each file above.

Writes are atomic (:func:`llmcore.files.atomic_dir`), so a crash leaves either the whole
checkpoint or none; only the last ``keep`` are kept. On load the checksums are verified and a
truncated or corrupt checkpoint is skipped (with a warning) for the one before it.

Checkpoints live under ``<root>/<fingerprint[:12]>/``: runs with different params never see
each other's checkpoints, so switching params back and forth resumes each configuration where
it stopped, and nothing is deleted behind the user's back. The cost is disk: each
configuration keeps its own last ``keep`` checkpoints until the folder is cleaned.

Nothing is unpickled: tensors load through safetensors or ``torch.load(weights_only=True)``,
everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmcore.files import atomic_dir, remove_leftovers, sha256_file
from llmcore.model.modeldir import load_weights, state_dict_for_save

if typing.TYPE_CHECKING:
    from llmcore.train.optim import Optimizers, OptimizersState


STEP_PREFIX = "step-"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-able description of what shapes a run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG a step draws from (dropout, shuffles), as tensors: JSON cannot hold them and
    pickle would run code at load."""
    np_state = typing.cast(tuple[Any, ...], np.random.get_state())
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([int(np_state[2]), int(np_state[3])], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor([py_state[0], *py_state[1]], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(x) for x in state["numpy_meta"].tolist())
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"].item())))
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))
    if torch.cuda.is_available():
        # restore only a full set: a checkpoint from a machine with other GPUs keeps the
        # current CUDA generators rather than half of them
        n = torch.cuda.device_count()
        cuda = [state[f"cuda{i}"] for i in range(n) if f"cuda{i}" in state]
        if len(cuda) == n:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Loaded:
    """A checkpoint read back: what :meth:`llmcore.train.fit.Trainer.restore` needs."""

    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: OptimizersState
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


class CheckpointManager:
    """Save / find / load checkpoints of one run configuration under ``root``."""

    collective = False  # rank 0 alone saves; every rank loads the same files

    def __init__(self, root: Path, fingerprint_hex: str, keep: int = 2,
                 log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint_hex
        self.dir = self.root / fingerprint_hex[:12]
        self.keep = keep
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=2))
        # a run killed while writing leaves hidden temporaries (in its configuration's folder,
        # whichever that was); one stage trains at a time, so none of them is being written
        if self.root.is_dir():
            for folder in [self.root, *(p for p in self.root.iterdir() if p.is_dir())]:
                remove_leftovers(folder / STEP_PREFIX, name="*")

    def steps(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def other_configurations(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir()
                if p.is_dir() and p != self.dir and not p.name.startswith(".")]

    def save(self, step: int, model: torch.nn.Module, optimizer: Optimizers,
             state: dict[str, Any]) -> Path:
        final = self.dir / f"{STEP_PREFIX}{step:08d}"

        def fill(tmp: Path) -> None:
            save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            full = {**state, "step": step, "fingerprint": self.fingerprint}
            (tmp / "state.json").write_text(json.dumps(full, indent=1, default=float) + "\n")
            sums = {name: sha256_file(tmp / name) for name in CHECKPOINT_FILES}
            (tmp / "checksums.json").write_text(json.dumps(sums, indent=1) + "\n")

        atomic_dir(final, fill)
        # pruned only after the new one is durable: a crash here still leaves `keep` intact
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint is complete and intact, else what is wrong."""
        sums_path = path / "checksums.json"
        if not sums_path.is_file():
            return "checksums.json is missing"
        try:
            sums = json.loads(sums_path.read_text())
        except json.JSONDecodeError:
            return "checksums.json is corrupt"
        for name in CHECKPOINT_FILES:
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if sha256_file(f) != sums.get(name):
                return f"{name} does not match its checksum"
        return None

    def load_latest(self) -> Loaded | None:
        """The newest intact checkpoint of this configuration, or None."""
        for path in reversed(self.steps()):
            problem = self.verify(path)
            if problem:
                self.log(f"checkpoint {path} is unusable ({problem}); trying the previous one")
                continue
            state = json.loads((path / "state.json").read_text())
            if state.get("fingerprint") != self.fingerprint:  # a copied or renamed folder
                self.log(f"checkpoint {path} belongs to another configuration; skipped")
                continue
            return Loaded(
                step=int(state["step"]),
                path=path,
                model=load_file(str(path / "model.safetensors")),
                optimizer=torch.load(path / "optimizer.pt", weights_only=True),
                rng=torch.load(path / "rng.pt", weights_only=True),
                state=state,
            )
        return None

    def restore(self, loaded: Loaded, model: torch.nn.Module, optimizer: Optimizers) -> None:
        """Put a loaded checkpoint's weights and optimizer state into the live run."""
        load_weights(model, loaded.model)
        optimizer.load_state_dict(loaded.optimizer)

    def save_best(self, model: torch.nn.Module, info: Mapping[str, float]) -> None:
        """The weights of the best evaluation so far (what ``export: best`` exports)."""
        self.write_best(state_dict_for_save(model), info)

    def write_best(self, weights: dict[str, torch.Tensor], info: Mapping[str, float]) -> None:

        def fill(tmp: Path) -> None:
            save_file(weights, str(tmp / "model.safetensors"))
            (tmp / "best.json").write_text(json.dumps({**info, "fingerprint": self.fingerprint,
                                                       "sha256": sha256_file(
                                                           tmp / "model.safetensors")}))

        atomic_dir(self.dir / "best", fill)

    def load_best(self) -> tuple[dict[str, torch.Tensor], dict[str, float | str]] | None:
        """The best weights and ``best.json`` (the evaluation's numbers, the run's fingerprint
        and the weights' SHA-256), or None when there are none intact."""
        path = self.dir / "best"
        try:
            info = json.loads((path / "best.json").read_text())
            if sha256_file(path / "model.safetensors") != info["sha256"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError) as exc:
            if path.exists():
                self.log(f"best weights in {path} are unusable ({exc})")
            return None
        return load_file(str(path / "model.safetensors")), info
