"""What a DPO or GRPO run needs around its objective: the context the shared step runs in.

:func:`policy_context` picks the precision (bf16 autocast only where native, as for
pretraining), and opens the run's checkpoints under a fingerprint of everything that shapes
its numbers: the section's params (bookkeeping ones left out), the seed, the device and
dtypes, the data (the starting weights, the pairs or tasks) and the code the objective runs
(its import closure, :func:`llmcore.lineage.code_hash`). A killed run with the same
fingerprint resumes bit-exactly; any change starts a fresh one.

:func:`rng_to_json` / :func:`rng_from_json` carry a :class:`random.Random` (the order of the
pairs, the choice of prompts) through a checkpoint's JSON state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llmcore.config.model import ModelConfig
from llmcore.config.train import NON_SHAPING, OptimConfig
from llmcore.device import precision
from llmcore.lineage import code_hash
from llmcore.tracking import Tracker
from llmcore.train.autocast_probe import auto_precision
from llmcore.train.checkpoint import CheckpointManager, fingerprint
from llmcore.train.step import Log, RunContext


def data_hash(value: Any) -> str:
    """SHA-256 of a JSON-able value (pairs, tasks, reference log-probs)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def policy_context(name: str, cfg: OptimConfig, *, seed: int, device: torch.device,
                   dtype: str, data: Mapping[str, str], code: Sequence[str],
                   checkpoint_dir: Path | None = None, log: Log = print,
                   tracker: Tracker | None = None,
                   model_cfg: ModelConfig | None = None) -> RunContext:
    """The :class:`RunContext` of one alignment run (checkpoints only with a directory; the
    per-step curves go to ``tracker`` as pretraining's and SFT's do). With the policy's
    ``model_cfg``, ``auto`` on a CPU is resolved as training's is (measured once per shape)."""
    prec = (precision(dtype, device) if model_cfg is None else
            auto_precision(dtype, device, model_cfg, cfg, 8, min(256, model_cfg.max_seq_len)))
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_SHAPING}
    fp = fingerprint({"params": shaping, "seed": seed, "code": code_hash(*code),
                      "dtype": str(prec.autocast), "muon_dtype": str(prec.orthogonalize),
                      "device": device.type, "data": dict(data)})
    manager = (CheckpointManager(checkpoint_dir, fp, keep=cfg.keep_checkpoints, log=log)
               if checkpoint_dir is not None else None)
    log(f"{name}: {prec.describe()}")
    return RunContext(device, prec.autocast, checkpoints=manager, tracker=tracker, log=log,
                      name=name, muon_dtype=prec.orthogonalize)


# random.Random.getstate() as JSON can hold it: [version, [state words], gauss or None]
RngJSON = list[int | list[int] | float | None]


def rng_to_json(rng: random.Random) -> RngJSON:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def rng_from_json(rng: random.Random, saved: RngJSON) -> None:
    version, state, gauss = saved
    if not isinstance(state, list):
        raise ValueError(f"a saved random state holds its words as a list (got {state!r})")
    rng.setstate((version, tuple(state), gauss))
