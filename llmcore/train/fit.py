"""Training runs: :func:`fit` turns one :class:`FitSpec` into trained weights.

``fit`` does everything around the loop (:mod:`llmcore.train.loop`): picks the device and
precision, joins a torchrun job if there is one, builds the model (fresh or from a model
directory), the data loader and the validation rows, resumes from the newest intact
checkpoint of the same configuration, trains, and picks the weights to export (the best
evaluation, or the last step).

A configuration is identified by a fingerprint of everything that shapes the numbers: model
and loop params, seed, precision, world size, data hashes and the code of the loop. Params
that only change bookkeeping (logging, checkpoint cadence, threads) are left out, so changing
them still resumes. Under ``parallel: fsdp`` the world size and per-rank batch are replaced by
the global batch: its sharded checkpoints (:mod:`llmcore.train.sharded`) resume at another
world size.

Under torchrun, ``parallel: ddp`` wraps the model in DistributedDataParallel (each rank holds
everything); ``parallel: fsdp`` shards it per block first (:mod:`llmcore.train.parallel`).
A peer lost mid-run (a killed trainer, a dead node, a cut network) ends the run on every
surviving rank within ``dist_timeout`` seconds with one line saying where to resume.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmcore.config.model import ModelConfig
from llmcore.config.train import NON_SHAPING, TrainConfig
from llmcore.data.shards import ShardDataset, ShardLoader
from llmcore.device import Precision, pick_device
from llmcore.files import sha256_file
from llmcore.lineage import code_hash
from llmcore.model.loss import unigram_bpb
from llmcore.model.modeldir import load_weights, read_weights
from llmcore.model.transformer import Transformer
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from llmcore.train.autocast_probe import auto_precision
from llmcore.train.checkpoint import CheckpointManager, fingerprint
from llmcore.train.loop import Dist, Log, RunContext, Trainer, TrainResult
from llmcore.train.parallel import full_state_dict, shard_model
from llmcore.train.sharded import ShardedCheckpoints


@dataclass(frozen=True)
class FitSpec:
    """Everything that defines one training run: the params, the data, where state goes."""

    model: ModelConfig
    train: TrainConfig
    shard_dir: Path
    train_split: str
    val_split: str | None
    token_bytes: tuple[int, ...]  # UTF-8 bytes per token id (from the tokenizer)
    checkpoint_dir: Path
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    data: Mapping[str, Any] = field(default_factory=dict)  # what the data is (hashes)
    init_from: Path | None = None  # a model directory whose weights start the run
    name: str = "train"
    # parameter-efficient fine-tuning, e.g. llmcore.model.lora.LoRASpec: ``apply(model)`` after the
    # initial weights load (freezes what must not train), ``export(state) -> (weights,
    # adapters)`` at the end, ``fingerprint()`` for the run's identity. None: train everything
    adapter: Any = None


@dataclass
class FitOutput:
    result: TrainResult
    model: torch.nn.Module
    export_weights: dict[str, torch.Tensor]
    export_step: int
    fingerprint: str
    params: int
    unigram_bpb: float | None
    data: dict[str, Any]  # the data fingerprint, with the initial weights' hash
    val_rows: int
    device: str  # Precision.describe(): what the run ran on, for its log and metrics
    precision: Precision  # the dtype of each part (kept in the metrics)
    trainable: int = 0  # parameters the optimizer updated
    adapter: dict[str, torch.Tensor] | None = None  # the exported step's adapters, if any



def init_distributed(device: torch.device, timeout_s: float = 900) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (if any).

    ``timeout_s`` bounds every wait for the other ranks: a rank whose peer is gone (a node
    lost, a network cut) fails instead of hanging (torch's default wait is 30 minutes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world), device


def run_fingerprint(spec: FitSpec, extra: Mapping[str, Any]) -> str:
    """What shapes a run: model and loop params, seed, precision, data and code hashes.

    Checkpoints are kept per fingerprint, so a resume never continues a run with other
    params, other data or other model/loop code (which would not be bit-exact).
    """
    # the code: every file this module reaches through imports (the loop, the model, the
    # optimizers, autocast, checkpoints and RNG restore), and the adapter's module
    modules = [__name__] + ([type(spec.adapter).__module__] if spec.adapter is not None else [])
    loop = {k: v for k, v in dataclasses.asdict(spec.train).items() if k not in NON_SHAPING}
    if spec.train.parallel == "fsdp":
        # sharded checkpoints load at any world size: what must match is the global batch
        world = int(extra.get("world_size", 1))
        loop["global_batch"] = loop.pop("batch_size") * world
        extra = {k: v for k, v in extra.items() if k != "world_size"}
    adapter = spec.adapter.fingerprint() if spec.adapter is not None else None
    return fingerprint({"model": dataclasses.asdict(spec.model), "train": loop,
                        "code": code_hash(*modules), "seed": spec.seed, **extra,
                        **({"adapter": adapter} if adapter else {})})


def _validation(spec: FitSpec, log: Log) -> ShardDataset | None:
    """The held-out rows, or None when the run explicitly trains without them."""
    if spec.val_split is None:
        return None
    val = ShardDataset(spec.shard_dir, spec.val_split)
    if len(val):
        return val
    where = f"{spec.shard_dir}: split {spec.val_split!r} has no rows"
    if spec.train.require_val:
        raise UserError(f"{where} (the held-out text is shorter than one row): add documents, "
                        f"raise fetch.val_fraction, lower pack.seq_len, or set "
                        f"{spec.name}.require_val: false to train without validation")
    log(f"{spec.name}: {where}; training without validation ({spec.name}.require_val is "
        "false), exporting the last weights")
    return None


def _steps_for_epochs(cfg: TrainConfig, loader: ShardLoader, spec: FitSpec, log: Log
                      ) -> TrainConfig:
    if cfg.epochs is None:
        return cfg
    steps = max(1, math.ceil(cfg.epochs * loader.steps_per_epoch / cfg.grad_accum))
    if cfg.warmup_steps >= steps:
        raise UserError(f"{spec.name}.warmup_steps ({cfg.warmup_steps}) must be < the "
                        f"{steps} steps that {spec.name}.epochs = {cfg.epochs} gives")
    log(f"{spec.name}: {cfg.epochs} epochs of {len(loader.ds)} rows = {steps} steps")
    return dataclasses.replace(cfg, max_steps=steps)


def _same_everywhere(fp: str, dist_info: Dist, name: str) -> None:
    """Every rank must train the same configuration: nodes started from other commits, params
    or data would otherwise average gradients of different runs without a word."""
    if not dist_info.enabled:
        return
    fps: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(fps, fp)
    differ = [r for r, f in enumerate(fps) if f != fps[0]]
    if differ:
        raise UserError(
            f"{name}: rank(s) {differ} would train another configuration than rank 0 (other "
            "params, code or data hashes): every node needs the same commit, params.yaml and "
            "data/ (compare `git rev-parse HEAD`, `git status` and `dvc status` on each)")


# what a collective says when a peer is gone: gloo's transport errors name their source file
# (.../gloo/transport/tcp/pair.cc: "Connection reset by peer", "Timed out waiting ..."), NCCL's
# are DistBackendError
_LOST = ("gloo/transport", "Connection reset", "Connection closed", "Timed out", "NCCL")


def _lost_peer(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or any(s in str(exc) for s in _LOST)


def _run(trainer: Trainer, name: str, dist_info: Dist, manager: CheckpointManager
         ) -> TrainResult:
    """``trainer.run()``; a lost peer becomes one clear line instead of a gloo traceback."""
    try:
        return trainer.run()
    except RuntimeError as exc:  # gloo raises RuntimeError, NCCL DistBackendError (a subclass)
        if not (dist_info.enabled and _lost_peer(exc)):
            raise
        steps = manager.steps()
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{name}: rank {dist_info.rank} of {dist_info.world_size} lost the other ranks "
            f"at step {trainer.step + 1} ({first}). The run stopped; the last checkpoint is "
            f"{steps[-1].name if steps else 'none'}. Start the same command on every node "
            "again to resume from it.") from None


def _build_model(spec: FitSpec, init: Mapping[str, torch.Tensor] | None, dist_info: Dist,
                 device: torch.device, sharded: bool) -> Transformer:
    """The model on ``device``, from ``init`` if given, with its adapter, sharded if asked."""
    # every rank draws the same initial weights (DDP would broadcast rank 0's anyway; FSDP
    # keeps each rank's own shard of them, so they must agree), then its own stream
    torch.manual_seed(spec.seed)
    model = Transformer(spec.model)
    if init is not None:
        load_weights(model, init)
    if spec.adapter is not None:  # after loading: adapters wrap the pretrained weights
        spec.adapter.apply(model)
    if dist_info.rank:
        torch.manual_seed(spec.seed + dist_info.rank)
    model.to(device)
    if sharded and dist_info.enabled:  # before the optimizer: it must see the shards
        shard_model(model, device, dist_info.world_size)
    return model


def fit(spec: FitSpec, tracker: Tracker | None = None, log: Log = print) -> FitOutput:
    """Build the model and data, resume if possible, train, and pick the weights to export."""
    cfg = spec.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info, device = init_distributed(pick_device(spec.device), cfg.dist_timeout)
    train_ds = ShardDataset(spec.shard_dir, spec.train_split)
    prec = auto_precision(spec.dtype, device, spec.model, cfg, cfg.batch_size,
                          train_ds.row_len - 1, distributed=dist_info.enabled)
    dtype = prec.autocast
    val_ds = _validation(spec, log)
    if train_ds.row_len - 1 > spec.model.max_seq_len:
        raise UserError(f"rows have {train_ds.row_len - 1} tokens but model.max_seq_len is "
                        f"{spec.model.max_seq_len}: raise model.max_seq_len or lower pack.seq_len")
    data = dict(spec.data)
    init = read_weights(spec.init_from) if spec.init_from is not None else None
    if spec.init_from is not None:
        data["init_sha256"] = sha256_file(Path(spec.init_from) / "model.safetensors")
    fp = run_fingerprint(spec, {"dtype": str(dtype), "muon_dtype": str(prec.orthogonalize),
                                "device": device.type,
                                "world_size": dist_info.world_size, "data": data})
    _same_everywhere(fp, dist_info, spec.name)
    sharded = cfg.parallel == "fsdp"
    model = _build_model(spec, init, dist_info, device, sharded)
    loader = ShardLoader(train_ds, cfg.batch_size, seed=spec.seed, rank=dist_info.rank,
                         world_size=dist_info.world_size)
    cfg = _steps_for_epochs(cfg, loader, spec, log)
    manager = (ShardedCheckpoints if sharded else CheckpointManager)(
        spec.checkpoint_dir, fp, keep=cfg.keep_checkpoints, log=log)
    tb = torch.tensor(list(spec.token_bytes), dtype=torch.int64)
    ctx = RunContext(device, dtype, tb, manager, tracker, dist_info, log, spec.name,
                     muon_dtype=prec.orthogonalize)
    trainer = Trainer(model, cfg, loader, val_ds, ctx)
    trainer.restore()
    where = prec.describe()
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    log(f"{spec.name}: {where}")
    log(f"{spec.name}: {model.num_parameters():,} parameters, {trainable:,} trainable "
        f"({trainable / model.num_parameters():.1%})")
    ug = None
    if val_ds is not None and dist_info.is_main:
        ug = unigram_bpb(train_ds, val_ds, tb, spec.model.vocab_size)
    result = _run(trainer, spec.name, dist_info, manager)
    # under FSDP a collective: the shards are gathered, rank 0 gets the whole weights
    export_weights, export_step = full_state_dict(model), result.step
    if cfg.export == "best" and dist_info.is_main:
        best = manager.load_best()
        if best is not None:
            export_weights, export_step = best[0], int(best[1]["step"])
    adapter = None
    if spec.adapter is not None and export_weights:  # the model directory: merged weights
        export_weights, adapter = spec.adapter.export(export_weights)
    exported = sum(t.numel() for t in export_weights.values())
    dist_info.barrier()
    return FitOutput(result, model, export_weights, export_step, fp,
                     exported if adapter is not None else model.num_parameters(), ug, data,
                     len(val_ds) if val_ds is not None else 0, where, prec, trainable,
                     adapter)
