"""The shared body of the training stages (pretrain, sft): fit, export, metrics, plots."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llmcore.config.base import BaseConfig
from llmcore.config.model import ModelConfig
from llmcore.config.train import TrainConfig
from llmcore.data.shards import data_fingerprint, read_manifest
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.model.modeldir import generation_config, save_model_dir
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from llmcore.train.fit import FitSpec, fit
from stages import paths
from stages._common import as_dict, git_commit, log, rank, repo_root, write_tsv

SHARDS, TOKENIZER = paths.SHARDS, paths.TOKENIZER


def train_and_export(stage: str, model_cfg: ModelConfig, cfg: TrainConfig, base: BaseConfig,
                     splits: tuple[str, str], tracker: Tracker, init_from: Path | None = None,
                     adapter: Any = None) -> dict[str, Any]:
    """Train on ``splits`` (train, val), write ``data/models/<stage>``; the stage's metrics."""
    root = repo_root()
    tracker.start_system_metrics()
    tok = LLMTokenizer.load(root / TOKENIZER)
    manifest = read_manifest(root / SHARDS)
    if manifest["tokenizer_sha256"] != tok.sha256():
        raise UserError(f"{SHARDS} was packed with another tokenizer: run `dvc repro pack`")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
    spec = FitSpec(model=model_cfg, train=cfg, shard_dir=root / SHARDS, train_split=splits[0],
                   val_split=splits[1], token_bytes=tuple(token_bytes(tok)),
                   checkpoint_dir=root / paths.checkpoint_dir(stage), seed=base.seed,
                   device=base.device, dtype=base.dtype,
                   data=data_fingerprint(manifest, list(splits)), init_from=init_from,
                   name=stage, adapter=adapter)
    out = fit(spec, tracker=tracker, log=log)
    if rank() != 0:
        return {}
    r = out.result
    params = {"model": dataclasses.asdict(model_cfg), stage: dataclasses.asdict(cfg),
              "base": as_dict(base)}
    meta = {"stage": stage, "step": out.export_step, "steps_trained": r.step,
            "git_commit": git_commit(root), "fingerprint": out.fingerprint, "params": params,
            "data": out.data, "best": r.best, "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
            "init_from": str(init_from.relative_to(root)) if init_from else None}
    generation = generation_config([tok.im_end_id, tok.eot_id], tok.pad_id)
    model_dir = root / paths.model_dir(stage)
    save_model_dir(model_dir, model_cfg, out.export_weights, root / TOKENIZER, meta, generation)
    if out.adapter is not None:  # the adapters alone too (for LoRA: PEFT's layout)
        adapter.save(out.adapter, model_dir / "adapter",
                     str(init_from.relative_to(root)) if init_from else None)
    write_tsv(root / paths.METRICS / f"{stage}_train.tsv", r.history,
              ["step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"])
    write_tsv(root / paths.METRICS / f"{stage}_val.tsv", r.evals, ["step", "val_loss", "val_bpb"])
    for curve in ("train", "val"):
        tracker.log_artifact(root / paths.METRICS / f"{stage}_{curve}.tsv", "plots")
    final = r.best if (cfg.export == "best" and r.best) else r.last_eval
    metrics = {
        f"{stage}/params": out.params,
        f"{stage}/trainable_params": out.trainable,
        f"{stage}/trainable_share": round(out.trainable / out.params, 5),
        f"{stage}/device": out.device,
        **out.precision.metrics(stage),
        f"{stage}/steps": r.step,
        f"{stage}/export_step": out.export_step,
        f"{stage}/val_rows": out.val_rows,
        f"{stage}/train_loss": r.history[-1]["loss"] if r.history else None,
        f"{stage}/val_loss": final["val_loss"] if final else None,
        f"{stage}/val_bpb": final["val_bpb"] if final else None,
        f"{stage}/unigram_bpb": out.unigram_bpb,
        f"{stage}/tokens_per_second": round(r.tokens_per_second, 1),
        f"{stage}/mfu": round(r.mfu, 5) if r.mfu is not None else None,
        f"{stage}/train_seconds": round(r.seconds, 2),
        f"{stage}/peak_memory_mb": round(r.peak_memory_mb, 1),
        f"{stage}/peak_flops": round(r.peak_flops, -6),
        f"{stage}/peak_source": r.peak_source,
        f"{stage}/stopped_early": int(r.stopped_early),
        f"{stage}/resumed_from": r.resumed_from if r.resumed_from is not None else -1,
    }
    log(f"{stage}: exported step {out.export_step} to {model_dir}")
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}
