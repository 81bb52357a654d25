"""DVC stage ``evaluate``: compare every model of the chain (pretrain, sft, dpo, rl) on the same
held-out data; write ``reports/evaluate/``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmcore.config import BaseConfig, EvaluateConfig
from llmcore.data.corpus import read_conversations, read_preferences
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.device import pick_device, precision
from llmcore.model.modeldir import load_model_dir
from llmcore.report.contamination import contamination_metrics, contamination_report, decontaminate
from llmcore.report.evaluate import clean_metrics, evaluate_model, summary_metrics
from llmcore.report.tables import clean_comparison, render_plots, write_reports
from llmcore.tracking import Tracker
from stages import paths
from stages._common import StageParams, log, repo_root, run_stage

PARAMS = ("base.seed", "base.device", "base.dtype", "evaluate")
MODELS = {"pretrain": paths.model_dir("pretrain"), "sft": paths.model_dir("sft"),
          "dpo": paths.model_dir("dpo"), "rl": paths.model_dir("rl")}
OUT = f"{paths.REPORTS}/evaluate"


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    evaluate: EvaluateConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, base, root = p.evaluate, p.base, repo_root()
    tok = LLMTokenizer.load(root / paths.TOKENIZER)
    device = pick_device(base.device)
    prec = precision(base.dtype, device)
    dtype = prec.autocast
    log(f"evaluate: {prec.describe()}")
    torch.manual_seed(base.seed)
    pre_val = ShardDataset(root / paths.SHARDS, "pretrain_val")
    sft_val = ShardDataset(root / paths.SHARDS, "sft_val")
    convs = read_conversations(root / paths.CORPUS, "val")
    out, checks, clean_rows = root / OUT, {}, None
    out.mkdir(parents=True, exist_ok=True)
    if cfg.contamination_ngram:
        checks = decontaminate(
            tok, val_conversations=convs,
            train_conversations=read_conversations(root / paths.CORPUS, "train"),
            preferences=read_preferences(root / paths.CORPUS, "train"),
            pretrain_train=ShardDataset(root / paths.SHARDS, "pretrain_train"),
            sft_train=ShardDataset(root / paths.SHARDS, "sft_train"), pretrain_val=pre_val,
            max_per_task=cfg.max_task_examples, max_rows=cfg.max_rows,
            n=cfg.contamination_ngram)
        data, page = contamination_report(checks, cfg.contamination_ngram)
        (out / "contamination.json").write_text(json.dumps(data, indent=1) + "\n")
        (out / "contamination.md").write_text(page)
        log(page.split("\n## ")[0])
        clean_rows = np.nonzero(~checks["docs_val"].contaminated)[0]
    tb = torch.tensor(token_bytes(tok))
    results = {}
    for name in cfg.models:
        path = MODELS[name]
        model, _ = load_model_dir(root / path, device)
        log(f"evaluate: {name} model")
        results[name] = evaluate_model(model, tok, pretrain_val=pre_val, sft_val=sft_val,
                                       conversations=convs, token_bytes=tb, cfg=cfg,
                                       device=device, dtype=dtype, clean_rows=clean_rows)
    seq_len = pre_val.row_len - 1
    write_reports(out, results, cfg.context_factors, cfg.prompts, seq_len)
    render_plots(root / paths.METRICS, out, results, cfg.context_factors, seq_len)
    tracker.log_artifact(out, "reports")
    log((out / "comparison.md").read_text())
    metrics = summary_metrics(results, cfg.context_factors)
    if checks:
        metrics.update(contamination_metrics(checks))
        metrics.update(clean_metrics(results, {k: r.contaminated for k, r in checks.items()}))
        with (out / "contamination.md").open("a") as f:
            f.write("\n## The metrics without them\n\n" + clean_comparison(metrics, list(results)))
    return metrics


def main() -> None:
    run_stage("evaluate", PARAMS, body, Params)


if __name__ == "__main__":
    main()
