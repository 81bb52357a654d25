"""The shared body of the training stages (pretrain, sft): fit, export, metrics, plots."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llmcore.checkpoint import save_model_dir
from llmcore.config import ModelConfig, TrainConfig, UserError
from llmcore.shards import read_manifest
from llmcore.tokenizer import LLMTokenizer, token_bytes
from llmcore.train import fit
from stages._common import git_commit, log, rank, repo_root, write_tsv

SHARDS, TOKENIZER = "data/shards", "data/tokenizer"


def data_fingerprint(manifest: dict[str, Any], splits: list[str]) -> dict[str, Any]:
    return {"tokenizer": manifest["tokenizer_sha256"], "seq_len": manifest["seq_len"],
            "shards": {s: [x["sha256"] for x in manifest["splits"][s]["shards"]]
                       for s in splits}}


def train_and_export(stage: str, model_cfg: ModelConfig, cfg: TrainConfig, base: Any,
                     train_split: str, val_split: str, tracker: Any,
                     init_weights: dict | None = None, extra_meta: dict | None = None
                     ) -> dict[str, Any]:
    root = repo_root()
    if hasattr(tracker, "start_system_metrics"):
        tracker.start_system_metrics()
    tok = LLMTokenizer.load(root / TOKENIZER)
    manifest = read_manifest(root / SHARDS)
    if manifest["tokenizer_sha256"] != tok.sha256():
        raise UserError(f"{SHARDS} was packed with another tokenizer: run `dvc repro pack`")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
    data = data_fingerprint(manifest, [train_split, val_split])
    if extra_meta and "init_sha256" in extra_meta:
        data["init"] = extra_meta["init_sha256"]
    out = fit(model_cfg=model_cfg, cfg=cfg, seed=base.seed, device_name=base.device,
              dtype_name=base.dtype, shard_dir=root / SHARDS, train_split=train_split,
              val_split=val_split, token_bytes=token_bytes(tok),
              checkpoint_root=root / "data" / "checkpoints" / stage, data_fingerprint=data,
              init_weights=init_weights, tracker=tracker, log=log, prefix=stage)
    if rank() != 0:
        return {}
    r = out.result
    meta = {"stage": stage, "step": out.export_step, "steps_trained": r.step,
            "git_commit": git_commit(root), "fingerprint": out.fingerprint,
            "params": {"model": dataclasses.asdict(model_cfg), stage: dataclasses.asdict(cfg),
                       "base": dataclasses.asdict(base)},
            "data": data, "best": r.best, "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
            **(extra_meta or {})}
    generation = {"eos_token_id": [tok.im_end_id, tok.eot_id], "pad_token_id": tok.pad_id,
                  "bos_token_id": None, "do_sample": False, "max_new_tokens": 256}
    model_dir = root / "data" / "models" / stage
    save_model_dir(model_dir, model_cfg, out.export_weights, root / TOKENIZER, meta, generation)
    write_tsv(root / "metrics" / f"{stage}_train.tsv", r.history,
              ["step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"])
    write_tsv(root / "metrics" / f"{stage}_val.tsv", r.evals, ["step", "val_loss", "val_bpb"])
    tracker.log_artifact(root / "metrics" / f"{stage}_train.tsv", "plots")
    final = r.best if (cfg.export == "best" and r.best) else r.last_eval
    metrics = {
        f"{stage}/params": out.params,
        f"{stage}/steps": r.step,
        f"{stage}/export_step": out.export_step,
        f"{stage}/train_loss": r.history[-1]["loss"] if r.history else None,
        f"{stage}/val_loss": final["val_loss"] if final else None,
        f"{stage}/val_bpb": final["val_bpb"] if final else None,
        f"{stage}/unigram_bpb": out.unigram_bpb,
        f"{stage}/tokens_per_second": round(r.tokens_per_second, 1),
        f"{stage}/mfu": round(r.mfu, 5) if r.mfu is not None else None,
        f"{stage}/train_seconds": round(r.seconds, 2),
        f"{stage}/peak_memory_mb": round(r.peak_memory_mb, 1),
        f"{stage}/stopped_early": int(r.stopped_early),
        f"{stage}/resumed_from": r.resumed_from if r.resumed_from is not None else -1,
    }
    log(f"{stage}: exported step {out.export_step} to {model_dir}")
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}
