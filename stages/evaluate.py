"""DVC stage ``evaluate``: compare every model of the chain (pretrain, sft, dpo, rl) on the same
held-out data; write ``reports/evaluate/``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmcore.config import BaseConfig, EvaluateConfig
from llmcore.data.corpus import read_conversations
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.device import pick_device, precision
from llmcore.model.modeldir import load_model_dir
from llmcore.report.evaluate import evaluate_model, summary_metrics
from llmcore.report.tables import render_plots, write_reports
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
    tb = torch.tensor(token_bytes(tok))
    results = {}
    for name, path in MODELS.items():
        model, _ = load_model_dir(root / path, device)
        log(f"evaluate: {name} model")
        results[name] = evaluate_model(model, tok, pretrain_val=pre_val, sft_val=sft_val,
                                       conversations=convs, token_bytes=tb, cfg=cfg,
                                       device=device, dtype=dtype)
    out, seq_len = root / OUT, pre_val.row_len - 1
    write_reports(out, results, cfg.context_factors, cfg.prompts, seq_len)
    render_plots(root / paths.METRICS, out, results, cfg.context_factors, seq_len)
    tracker.log_artifact(out, "reports")
    log((out / "comparison.md").read_text())
    return summary_metrics(results, cfg.context_factors)


def main() -> None:
    run_stage("evaluate", PARAMS, body, Params)


if __name__ == "__main__":
    main()
