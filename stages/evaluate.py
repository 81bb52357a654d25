"""DVC stage ``evaluate``: compare every model of the chain (pretrain, sft, dpo, rl) on the
test split; write ``reports/evaluate/``.

First it checks every evaluation set's contract against every training stream
(:mod:`llmcore.eval.contamination`) and stops, naming the set and the example, when one is
broken: no param turns the check off. Only then are the models scored on test (every
decision of the chain read val). The final model also answers the val task questions
(``evaluate/val/...``): the figures a comparison of recipes decides on, never test's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from llmcore.config.base import BaseConfig
from llmcore.config.evaluate import EvaluateConfig
from llmcore.data.corpus import read_conversations
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.device import pick_device, precision
from llmcore.eval.contamination import (
    Contract,
    ContractViolation,
    check_contract,
    contamination_metrics,
)
from llmcore.eval.evaluate import (
    clean_metrics,
    drawn_samples,
    evaluate_model,
    summary_metrics,
    task_accuracy,
    task_metrics,
)
from llmcore.metric_keys import VAL, contract_metric
from llmcore.model.modeldir import load_model_dir
from llmcore.report.tables import clean_comparison, render_plots, write_reports
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from stages import chain, paths
from stages._common import StageParams, log, repo_root, run_stage

STAGE = "evaluate"
OUT = f"{paths.REPORTS}/evaluate"
SAMPLES_PER_TASK = 2  # test questions per task drawn at random for the README


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    evaluate: EvaluateConfig


def _contract(p: Params, tok: LLMTokenizer) -> Contract:
    """Check every set's contract; write the report. Raises ContractViolation (one line: the
    set and its first violating example) when one breaks."""
    cfg, root = p.evaluate, repo_root()
    c = check_contract(tok, root / paths.CORPUS, root / paths.SHARDS, cfg.max_task_examples,
                       cfg.choices, cfg.contamination_ngram)
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / "contamination.json").write_text(json.dumps(c.data, indent=1) + "\n")
    (out / "contamination.md").write_text(c.page)
    if c.violation:
        raise ContractViolation(f"{c.violation} (see {OUT}/contamination.md); rebuild the "
                                "corpus with `dvc repro fetch`, or fix the data that leaks")
    log(c.page.split("\n## ")[0])
    return c


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, base, root = p.evaluate, p.base, repo_root()
    chained = chain.model_deps("evaluate", root)
    if [m for m in cfg.models if m not in chained] or \
            sorted(cfg.models, key=chain.models(root).index) != cfg.models:
        raise UserError(f"params.yaml: evaluate.models must name models of the chain in its "
                        f"order, from those the evaluate stage depends on in dvc.yaml: "
                        f"{', '.join(chained)} (got {cfg.models})")
    tok = LLMTokenizer.load(root / paths.TOKENIZER)
    device = pick_device(base.device)
    prec = precision(base.dtype, device)
    log(f"evaluate: {prec.describe()}")
    torch.manual_seed(base.seed)
    contract = _contract(p, tok)
    docs_test = ShardDataset(root / paths.SHARDS, "pretrain_test")
    sft_test = ShardDataset(root / paths.SHARDS, "sft_test")
    convs = read_conversations(root / paths.CORPUS, "test")
    out = root / OUT
    tb = torch.tensor(token_bytes(tok))
    results = {}
    for name in cfg.models:
        model, _ = load_model_dir(root / chain.model_dep("evaluate", name, root), device)
        log(f"evaluate: {name} model")
        results[name] = evaluate_model(model, tok, docs=docs_test, replies=sft_test,
                                       conversations=convs, token_bytes=tb, cfg=cfg,
                                       device=device, dtype=prec.autocast)
    # the final model (the one quantize takes) on val too: what a comparison decides on
    final = cfg.models[-1]
    log(f"evaluate: {final} model on the val tasks (for decisions)")
    val_tasks = task_accuracy(model, tok, read_conversations(root / paths.CORPUS, "val"),
                              cfg.max_task_examples, cfg.max_new_tokens)
    seq_len = docs_test.row_len - 1
    drawn = drawn_samples(results[final]["tasks"], convs, SAMPLES_PER_TASK, base.seed)
    write_reports(out, results, cfg.context_factors, cfg.prompts, seq_len, drawn)
    render_plots(root / paths.METRICS, out, results, cfg.context_factors, seq_len)
    tracker.log_artifact(out, "reports")
    log((out / "comparison.md").read_text())
    metrics = summary_metrics(results, cfg.context_factors)
    metrics.update(task_metrics(VAL, val_tasks))
    metrics.update(contamination_metrics(contract.checks))
    metrics[contract_metric("violations")] = 0  # a violation stopped the stage above
    metrics[contract_metric("test_words_token_covered")] = contract.coverage["share"]
    metrics.update(clean_metrics(results, {k: r.contaminated for k, r in contract.checks.items()}))
    with (out / "contamination.md").open("a") as f:
        f.write("\n## The metrics without them\n\n" + clean_comparison(metrics, list(results)))
    return metrics


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
