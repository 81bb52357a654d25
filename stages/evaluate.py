"""DVC stage ``evaluate``: compare the pretrained and the SFT model; write ``reports/``."""

from __future__ import annotations

import math

import torch

from llmcore.checkpoint import load_model_dir
from llmcore.corpus import read_conversations
from llmcore.evaluate import evaluate_model
from llmcore.shards import ShardDataset
from llmcore.tokenizer import LLMTokenizer, token_bytes
from llmcore.train import pick_device, pick_dtype
from stages._common import log, repo_root, run_stage

MODELS = {"pretrain": "data/models/pretrain", "sft": "data/models/sft"}


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_reports(out, results, factors, prompts, seq_len) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    lines = ["# Pretrained vs SFT", "", "| metric | " + " | ".join(results) + " |",
             "|---|" + "---|" * len(results)]
    rows = [("val bpb (pretraining text)", lambda r: r["contexts"][1]["bpb"]),
            ("val bpb (SFT replies)", lambda r: r["sft_val"]["bpb"]),
            ("doc questions, multiple choice", lambda r: r["doc_mc"]["accuracy"])]
    rows += [(f"{t} exact match", lambda r, t=t: r["tasks"][t]["exact_match"]) for t in tasks]
    rows += [("replies ending with <\\|im_end\\|>", lambda r: sum(
        v["im_end_rate"] * v["n"] for v in r["tasks"].values()) / max(1, sum(
            v["n"] for v in r["tasks"].values())))]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(get(r)) for r in results.values()) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    ext = ["# Length extrapolation (bits per byte)", "",
           f"Training context: {seq_len} tokens.", "",
           "| model | " + " | ".join(f"{f}x ({f * seq_len})" for f in factors) + " |",
           "|---|" + "---|" * len(factors)]
    for name, r in results.items():
        ext.append(f"| {name} | " + " | ".join(
            fmt(r["contexts"][f]["bpb"] if r["contexts"][f] else None) for f in factors) + " |")
    (out / "extrapolation.md").write_text("\n".join(ext) + "\n")
    sm = ["# Samples (greedy)", ""]
    for i, p in enumerate(prompts):
        sm += [f"## {p}", ""]
        for name, r in results.items():
            sm += [f"**{name}:**", "", "```", r["samples"][i] or "(empty)", "```", ""]
    (out / "samples.md").write_text("\n".join(sm))


def read_tsv(path):
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, (float(x) if x else None for x in ln.split("\t")), strict=True))
            for ln in lines[1:]]


def render_plots(root, out, results, factors, seq_len) -> list:
    """PNG charts that need no network (dvc plots' HTML pulls its script from a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage, ax in zip(("pretrain", "sft"), axes, strict=True):
        train = read_tsv(root / "metrics" / f"{stage}_train.tsv")
        val = read_tsv(root / "metrics" / f"{stage}_val.tsv")
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                    label="val loss")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
    files.append(out / "loss_curves.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs = [f * seq_len for f in factors if r["contexts"][f]]
        ax.plot(xs, [r["contexts"][f]["bpb"] for f in factors if r["contexts"][f]], "o-",
                label=name)
    ax.axvline(seq_len, color="grey", linestyle=":", label="training context")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Length extrapolation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "extrapolation.png", dpi=100)
    plt.close(fig)
    files.append(out / "extrapolation.png")
    return files


def body(cfgs, tracker):
    cfg, base, root = cfgs["evaluate"], cfgs["base"], repo_root()
    tok = LLMTokenizer.load(root / "data/tokenizer")
    device = pick_device(base.device)
    dtype = pick_dtype(base.dtype, device)
    torch.manual_seed(base.seed)
    pre_val = ShardDataset(root / "data/shards", "pretrain_val")
    sft_val = ShardDataset(root / "data/shards", "sft_val")
    convs = read_conversations(root / "data/corpus", "val")
    tb = torch.tensor(token_bytes(tok))
    results = {}
    for name, path in MODELS.items():
        model, _ = load_model_dir(root / path, device)
        log(f"evaluate: {name} model")
        results[name] = evaluate_model(model, tok, pretrain_val=pre_val, sft_val=sft_val,
                                       conversations=convs, token_bytes=tb, cfg=cfg,
                                       device=device, dtype=dtype)
    write_reports(root / "reports", results, cfg.context_factors, cfg.prompts,
                  pre_val.row_len - 1)
    render_plots(root, root / "reports", results, cfg.context_factors, pre_val.row_len - 1)
    tracker.log_artifact(root / "reports", "reports")
    metrics = {}
    for name, r in results.items():
        p = f"evaluate/{name}"
        metrics[f"{p}/val_bpb"] = r["contexts"][1]["bpb"] if r["contexts"][1] else None
        metrics[f"{p}/sft_val_bpb"] = r["sft_val"]["bpb"]
        metrics[f"{p}/sft_val_loss"] = r["sft_val"]["loss"]
        for f in cfg.context_factors:
            metrics[f"{p}/bpb_ctx{f}x"] = r["contexts"][f]["bpb"] if r["contexts"][f] else None
        for task, v in r["tasks"].items():
            metrics[f"{p}/{task}_exact_match"] = v["exact_match"]
        n = sum(v["n"] for v in r["tasks"].values())
        metrics[f"{p}/im_end_rate"] = sum(v["im_end_rate"] * v["n"]
                                          for v in r["tasks"].values()) / max(n, 1)
        metrics[f"{p}/doc_mc_accuracy"] = r["doc_mc"]["accuracy"]
    log((root / "reports/comparison.md").read_text())
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def main() -> None:
    run_stage("evaluate", ["base", "evaluate"], body)


if __name__ == "__main__":
    main()
