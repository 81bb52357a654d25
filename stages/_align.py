"""What the alignment stages (dpo, rl) share: the policy in, the model directory out.

Each starts from the previous model of the chain, trains all weights or LoRA adapters
(``method``), and writes a plain model directory (adapters merged; the adapters alone under
``adapter/``). ``max_steps: 0`` makes the stage a copy, so a user skips it with a param.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from llmcore.config.base import BaseConfig
from llmcore.config.lora import LoRAConfig
from llmcore.data.corpus import ConversationRow
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.device import pick_device
from llmcore.eval.evaluate import split_bpb, task_accuracy
from llmcore.model.lora import LoRASpec, trainable_parameters
from llmcore.model.modeldir import load_model_dir, save_model_dir, state_dict_for_save
from llmcore.tracking import register_model
from stages import paths
from stages._common import git_commit, log, model_tags, repo_root, write_tsv


def copy_model(stage: str, src: str, curves: dict[str, list[str]]) -> dict[str, Any]:
    """``max_steps: 0``: the stage's model is the one it starts from (``src``), unchanged
    (its curves empty)."""
    root, out = repo_root(), paths.model_dir(stage)
    for name, columns in curves.items():
        write_tsv(root / paths.METRICS / name, [], columns)
    tmp = root / f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(root / src, tmp)
    shutil.rmtree(root / out, ignore_errors=True)
    tmp.rename(root / out)
    log(f"{stage}: max_steps is 0, {out} is a copy of {src}")
    return {f"{stage}/skipped": 1}


def load_policy(src: Path, base: BaseConfig, method: str, lora_cfg: LoRAConfig
                ) -> tuple[Any, Any, LoRASpec | None, dict[str, float]]:
    """(policy, model config, adapter spec or None, trainable-parameter metrics)."""
    device = pick_device(base.device)
    model, cfg = load_model_dir(src, device)
    model = model.float()  # alignment updates are small: train in fp32
    adapter = LoRASpec.from_config(lora_cfg) if method == "lora" else None
    if adapter is not None:
        adapter.apply(model)
    trainable, total = trainable_parameters(model)
    return model, cfg, adapter, {"trainable_params": trainable,
                                 "trainable_share": round(trainable / total, 5)}


def exact_match(model: Any, tok: LLMTokenizer, convs: list[ConversationRow], per_task: int,
                max_new_tokens: int) -> dict[str, float]:
    model.eval()
    return {t: v["exact_match"] for t, v in
            task_accuracy(model, tok, convs, per_task, max_new_tokens).items()}


def save_policy(stage: str, model: Any, cfg: Any, src: Path, adapter: LoRASpec | None,
                cfgs: dict[str, Any], tracker: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``data/models/<stage>`` (merged weights), register it; its bpb metric."""
    root = repo_root()
    out = root / paths.model_dir(stage)
    state = state_dict_for_save(model)
    adapters = None
    if adapter is not None:
        state, adapters = adapter.export(state)
    generation = json.loads((src / "generation_config.json").read_text())
    full_meta = {"stage": stage, "git_commit": git_commit(root),
                 "init_from": str(src.relative_to(root)), **meta}
    save_model_dir(out, cfg, state, src, full_meta, generation)
    if adapter is not None and adapters:
        adapter.save(adapters, out / "adapter", str(src.relative_to(root)))
    model, _ = load_model_dir(out, next(model.parameters()).device)
    tok = LLMTokenizer.load(out)
    bpb = split_bpb(model, ShardDataset(root / paths.SHARDS, "sft_val"),
                    torch.tensor(token_bytes(tok)))
    registered = register_model(tracker, out, bpb, stage, tags=model_tags(root, stage, cfgs))
    if registered:
        log(f"{stage}: {registered.message}")
    return {f"{stage}/registry_bpb": round(bpb, 5) if math.isfinite(bpb) else None}
