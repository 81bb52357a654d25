"""Checkpoints with exact resume, and self-describing model directories.

A checkpoint is a directory ``step-00000100/`` holding

  * ``model.safetensors``: the weights;
  * ``optimizer.pt``: the optimizer state (tensors and numbers only);
  * ``rng.pt``: torch (CPU and CUDA), NumPy and Python RNG states, as tensors;
  * ``state.json``: step, data loader position, best validation so far, log history, and the
    fingerprint of everything that shapes the run;
  * ``checksums.json``: SHA-256 of each file above.

Writes are atomic: everything goes to a temporary directory, each file is fsynced, the
directory is renamed into place and its parent fsynced, so a crash leaves either the whole
checkpoint or none. Only the last ``keep`` are kept. On load the checksums are verified and a
truncated or corrupt checkpoint is skipped (with a warning) for the one before it.

Checkpoints live under ``<root>/<fingerprint[:12]>/``: runs with different params never see
each other's checkpoints, so switching params back and forth resumes each configuration where
it stopped, and nothing is deleted behind the user's back. The cost is disk: each
configuration keeps its own last ``keep`` checkpoints until the folder is cleaned.

Nothing is unpickled: tensors load through safetensors or ``torch.load(weights_only=True)``,
everything else is JSON.

A model directory (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``, ``meta.json``) rebuilds the model with nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmcore.config import ModelConfig, UserError

STEP_PREFIX = "step-"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says why and what to do."""


def fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON-able description of what shapes a run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_dir(final: Path, fill: Any) -> None:
    """Create ``final`` by filling a temporary sibling (``fill(tmp)``) and renaming it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)
        fill(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied weights stored once (safetensors rejects shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    return out


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`state_dict_for_save` (tied copies may be absent)."""
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) \
        else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
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
        n = torch.cuda.device_count()
        cuda = [state[f"cuda{i}"] for i in range(n) if f"cuda{i}" in state]
        if len(cuda) == n:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Loaded:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


class CheckpointManager:
    """Save / find / load checkpoints of one run configuration under ``root``."""

    def __init__(self, root: Path, fingerprint_hex: str, keep: int = 2,
                 log: Any = None) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint_hex
        self.dir = self.root / fingerprint_hex[:12]
        self.keep = keep
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=2))

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

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
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
            if state.get("fingerprint") != self.fingerprint:
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

    def save_best(self, model: torch.nn.Module, info: dict[str, Any]) -> None:
        def fill(tmp: Path) -> None:
            save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
            (tmp / "best.json").write_text(json.dumps({**info, "fingerprint": self.fingerprint,
                                                       "sha256": sha256_file(
                                                           tmp / "model.safetensors")}))

        atomic_dir(self.dir / "best", fill)

    def load_best(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
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


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_model_dir(out: Path, cfg: ModelConfig, weights: Mapping[str, torch.Tensor],
                   tokenizer_dir: Path, meta: Mapping[str, Any],
                   generation: Mapping[str, Any],
                   quantization: Mapping[str, Any] | None = None) -> None:
    """Write a self-describing, Hugging Face shaped model directory atomically."""

    def fill(tmp: Path) -> None:
        config = {"architectures": ["LLMCoreForCausalLM"], "model_type": "llmcore",
                  **dataclasses.asdict(cfg), "torch_dtype": "float32"}
        if quantization:
            config["quantization"] = dict(quantization)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        (tmp / "generation_config.json").write_text(json.dumps(dict(generation), indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")

    atomic_dir(Path(out), fill)


def read_model_config(path: Path) -> ModelConfig:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a model directory")
    raw = json.loads(config_path.read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in fields})


def load_model_dir(path: Path, device: str | torch.device = "cpu",
                   quant_runtime: str = "auto") -> tuple[Any, ModelConfig]:
    """Rebuild the model of a model directory (weights on ``device``, eval mode).

    Quantized directories (``quantization`` in config.json) load through
    :func:`llmcore.quantize.load_quantized` with ``quant_runtime``.
    """
    from llmcore.model import Transformer

    cfg = read_model_config(path)
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization")
    model = Transformer(cfg).to(device)
    try:
        weights = load_file(str(Path(path) / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}/model.safetensors is unreadable ({exc})") from exc
    if quant:
        from llmcore.quantize import load_quantized

        load_quantized(model, weights, quant, quant_runtime)
    else:
        load_weights(model, weights)
    return model.eval(), cfg
