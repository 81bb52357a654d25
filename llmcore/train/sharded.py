"""Checkpoints of sharded (FSDP) runs, written with ``torch.distributed.checkpoint``.

Each rank writes its own shards: no rank ever holds the whole model and optimizer state,
which is the point of sharding. A checkpoint is a directory ``step-00000100/`` holding

  * ``dcp/``: the model and optimizer state as DCP wrote it (a ``.distcp`` file per rank and
    a ``.metadata`` file saying which piece of which tensor is where);
  * ``rng-00000.pt``, ``rng-00001.pt``, ...: each rank's RNG states;
  * ``state.json``: step, data position, history, fingerprint (rank 0's, as for DDP);
  * ``checksums.json``: SHA-256 of every file above.

Atomic as the unsharded ones are: rank 0 makes a hidden temporary directory, every rank writes
into it, and only when all have finished does rank 0 write the checksums, fsync and rename it
into place; older checkpoints are pruned after that. Every rank must see the same directory,
so on several machines the checkpoint folder sits on a shared filesystem.

Because DCP's metadata records the global shape of every tensor, a checkpoint loads at any
world size: 2 ranks' shards resume in 1 process, or in 4, each rank reading only the pieces
it now owns. The run's fingerprint therefore names the global batch, not the world size
(see :func:`llmcore.train.fit.run_fingerprint`). Resumed at the world size it was written with,
a run is bit-exact; at another, the reductions add in another order, so equal to rounding.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from llmcore.files import atomic_dir, sha256_file
from llmcore.train.checkpoint import STEP_PREFIX, CheckpointManager, Loaded, rng_state
from llmcore.train.parallel import full_state_dict

if TYPE_CHECKING:
    from llmcore.train.optim import Optimizers

DCP_DIR = "dcp"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns on every save and load outside a process group; one process (a sharded
    run resumed alone, or written alone) is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.is_file() and p.name != "checksums.json")


class ShardedCheckpoints(CheckpointManager):
    """Save / find / load sharded checkpoints; ``save`` and ``restore`` are collectives."""

    collective = True  # every rank calls save() and restore(), not rank 0 alone

    def save(self, step: int, model: torch.nn.Module, optimizer: Optimizers,
             state: dict[str, Any]) -> Path:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        final = self.dir / f"{STEP_PREFIX}{step:08d}"
        msd, osd = get_state_dict(model, optimizer.optimizers)

        def write(tmp: Path) -> None:  # every rank, into the same temporary directory
            with _one_process_is_fine():
                dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR))
            torch.save(rng_state(), tmp / rng_file(_rank()))
            if _world() > 1:
                dist.barrier()  # every rank's files are written

        if _rank() == 0:
            def fill(tmp: Path) -> None:
                _broadcast(str(tmp))
                write(tmp)
                full = {**state, "step": step, "fingerprint": self.fingerprint,
                        "world_size": _world()}
                (tmp / "state.json").write_text(json.dumps(full, indent=1, default=float) + "\n")
                sums = {name: sha256_file(tmp / name) for name in _files(tmp)}
                (tmp / "checksums.json").write_text(json.dumps(sums, indent=1) + "\n")

            atomic_dir(final, fill)
            for old in self.steps()[: -self.keep]:  # after the new one is durable
                shutil.rmtree(old, ignore_errors=True)
        else:
            write(Path(_broadcast(None)))
        if _world() > 1:
            dist.barrier()  # nobody goes on before the checkpoint is in place
        return final

    def save_best(self, model: torch.nn.Module, info: Mapping[str, float]) -> None:
        """A collective: the shards are gathered into whole weights, which rank 0 writes."""
        weights = full_state_dict(model)
        if _rank() == 0:
            self.write_best(weights, info)

    def verify(self, path: Path) -> str | None:
        sums_path = path / "checksums.json"
        if not sums_path.is_file():
            return "checksums.json is missing"
        try:
            sums = json.loads(sums_path.read_text())
        except json.JSONDecodeError:
            return "checksums.json is corrupt"
        if not isinstance(sums, dict) or "state.json" not in sums \
                or f"{DCP_DIR}/.metadata" not in sums:
            return "checksums.json does not list a sharded checkpoint"
        for name, digest in sums.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if sha256_file(f) != digest:
                return f"{name} does not match its checksum"
        return None

    def load_latest(self) -> Loaded | None:
        """The newest intact checkpoint of this configuration (rank 0 decides which, so every
        rank resumes from the same one); the model and optimizer are read by :meth:`restore`."""
        chosen: str | None = None
        if _rank() == 0:
            for path in reversed(self.steps()):
                problem = self.verify(path)
                if problem:
                    self.log(f"checkpoint {path} is unusable ({problem}); trying the previous one")
                    continue
                state = json.loads((path / "state.json").read_text())
                if state.get("fingerprint") != self.fingerprint:
                    self.log(f"checkpoint {path} belongs to another configuration; skipped")
                    continue
                chosen = str(path)
                break
        chosen = _broadcast(chosen)
        if chosen is None:
            return None
        path = Path(chosen)
        state = json.loads((path / "state.json").read_text())
        mine = path / rng_file(_rank())
        # at another world size a rank may have no RNG file of its own: rank 0's (as DDP does)
        rng = torch.load(mine if mine.is_file() else path / rng_file(0), weights_only=True)
        return Loaded(step=int(state["step"]), path=path, model={}, optimizer={}, rng=rng,
                      state=state)

    def restore(self, loaded: Loaded, model: torch.nn.Module, optimizer: Optimizers) -> None:
        """Read the model and optimizer shards this rank owns now (any world size)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        # the live state is the template: DCP fills each tensor with the piece this rank owns
        # (get_state_dict first gives a fresh optimizer its state, by a step at lr 0)
        msd, osd = get_state_dict(model, optimizer.optimizers)
        with _one_process_is_fine():
            dcp_load({"model": msd, "optim": osd}, checkpoint_id=str(loaded.path / DCP_DIR))
        set_state_dict(model, optimizer.optimizers, model_state_dict=msd, optim_state_dict=osd)
