"""The evaluate stage's reports: Markdown tables, samples and PNG charts.

Plain files a reader opens without running anything: ``comparison.md`` (every model side by
side), ``extrapolation.md`` (bits per byte at longer contexts), ``samples.md`` (greedy replies
to fixed prompts), and PNG charts drawn with matplotlib's Agg backend, which need no display
and no network (``dvc plots``' HTML pulls its charting script from a CDN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

from llmcore.data.tasks import question_subject
from llmcore.eval.evaluate import DrawnSample, Metrics, ModelResults


def fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def fmt_ci(value: float, ci: tuple[float, float], n: int) -> str:
    """An accuracy with its 95% interval and sample size: ``0.340 [0.28, 0.41] n=200``."""
    if n == 0 or math.isnan(value):
        return "n/a"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] n={n}"


def write_reports(out: Path, results: Mapping[str, ModelResults], factors: list[int],
                  prompts: list[str], seq_len: int, drawn: list[DrawnSample] | None = None
                  ) -> None:
    """comparison.md, extrapolation.md, samples.md and samples.json (what the README shows)
    for the results of :mod:`evaluate`. samples.json also holds the split each prompt's
    subject falls in and ``drawn`` (the final model's randomly drawn test questions)."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    lines = ["# Models compared", "", "| metric | " + " | ".join(results) + " |",
             "|---|" + "---|" * len(results)]
    rows: list[tuple[str, Callable[[ModelResults], str]]] = [
            # the training context's own window: None only with no held-out text at all
            ("test bpb (docs)", lambda r: fmt(c["bpb"] if (c := r["contexts"][1]) else None)),
            ("test bpb (SFT replies)", lambda r: fmt(r["sft"]["bpb"])),
            ("doc questions, multiple choice", lambda r: fmt_ci(
                r["doc_mc"]["accuracy"], r["doc_mc"]["ci95"], r["doc_mc"]["n"]))]
    rows += [(f"{t} exact match", _task_cell(t)) for t in tasks]
    rows += [("replies ending with <\\|im_end\\|>", lambda r: fmt(sum(
        v["im_end_rate"] * v["n"] for v in r["tasks"].values()) / max(1, sum(
            v["n"] for v in r["tasks"].values()))))]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(get(r) for r in results.values()) + " |")
    lines += ["", "Accuracies: value [95% Wilson interval] n=examples."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    ext = ["# Length extrapolation (bits per byte)", "",
           f"Training context: {seq_len} tokens.", "",
           "| model | " + " | ".join(f"{f}x ({f * seq_len})" for f in factors) + " |",
           "|---|" + "---|" * len(factors)]
    for name, r in results.items():
        ext.append(f"| {name} | " + " | ".join(
            fmt(c["bpb"] if c else None) for c in (r["contexts"][f] for f in factors)) + " |")
    (out / "extrapolation.md").write_text("\n".join(ext) + "\n")
    sm = ["# Samples (greedy)", ""]
    for i, p in enumerate(prompts):
        sm += [f"## {p}", ""]
        for name, r in results.items():
            sm += [f"**{name}:**", "", "```", r["samples"][i] or "(empty)", "```", ""]
    (out / "samples.md").write_text("\n".join(sm))
    replies = {name: list(r["samples"]) for name, r in results.items()}
    subjects = [question_subject(p) for p in prompts]
    data = {"prompts": list(prompts), "replies": replies,
            "subjects": [None if s is None else {"key": s[0], "split": s[1]} for s in subjects],
            "final_model": list(results)[-1], "drawn": drawn or []}
    (out / "samples.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def clean_comparison(metrics: Metrics, models: list[str]) -> str:
    """A Markdown table of every metric that has a ``_clean`` twin (from
    :func:`llmcore.eval.evaluate.clean_metrics`): on every example / without the
    contaminated ones (how many are left)."""
    first = f"evaluate/{models[0]}/"
    names = sorted(k[len(first):-len("_clean")] for k in metrics
                   if k.startswith(first) and k.endswith("_clean"))
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in names:
        cells = []
        for m in models:
            p = f"evaluate/{m}/{name}"
            n = metrics.get(f"{p}_clean_n")
            left = "" if n is None else f" (n={n})"
            cells.append(f"{fmt(metrics.get(p))} / {fmt(metrics.get(p + '_clean'))}{left}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(["Every example / without the contaminated ones (examples left):", "",
                      *lines]) + "\n"


def read_tsv(path: Path) -> list[dict[str, float | None]]:
    """Rows of a metrics TSV written by a training stage ([] when there is none)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, (float(x) if x else None for x in ln.split("\t")), strict=True))
            for ln in lines[1:]]


def _task_cell(task: str) -> Callable[[ModelResults], str]:
    def cell(r: ModelResults) -> str:
        m = r["tasks"][task]
        return fmt_ci(m["exact_match"], m["ci95"], m["n"])
    return cell


def render_plots(metrics_dir: Path, out: Path, results: Mapping[str, ModelResults],
                 factors: list[int], seq_len: int) -> list[Path]:
    """loss_curves.png (train and val loss per training stage) and extrapolation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage, ax in zip(("pretrain", "sft"), axes, strict=True):
        train = read_tsv(metrics_dir / f"{stage}_train.tsv")
        val = read_tsv(metrics_dir / f"{stage}_val.tsv")
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
    alignment = _alignment_curves(metrics_dir, out)
    if alignment is not None:
        files.append(alignment)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs = [f * seq_len for f in factors if r["contexts"][f]]
        ax.plot(xs, [c["bpb"] for c in (r["contexts"][f] for f in factors) if c], "o-",
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


def _alignment_curves(metrics_dir: Path, out: Path) -> Path | None:
    """alignment.png: DPO reward accuracy (train and held out) and the GRPO mean reward per
    step; None when neither stage trained."""
    import matplotlib.pyplot as plt

    dpo, dpo_val = read_tsv(metrics_dir / "dpo_train.tsv"), read_tsv(metrics_dir / "dpo_val.tsv")
    rl = read_tsv(metrics_dir / "rl_train.tsv")
    if not dpo and not rl:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if dpo:
        a.plot([r["step"] for r in dpo], [r["reward_accuracy"] for r in dpo], alpha=0.5,
               label="train batch")
    if dpo_val:
        a.plot([r["step"] for r in dpo_val], [r["reward_accuracy"] for r in dpo_val], "o-",
               label="held-out pairs")
    a.set_title("DPO: reward accuracy")
    a.set_xlabel("step")
    a.legend()
    if rl:
        steps, rewards = [r["step"] for r in rl], [r["reward"] or 0.0 for r in rl]
        b.plot(steps, rewards, alpha=0.35, label="mean reward per step")
        window = 10  # each step draws other prompts: the trend needs a moving average
        smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(rewards))]
        b.plot(steps, smooth, label=f"mean of the last {window} steps")
    b.set_title("GRPO: reward of sampled replies (1 = exact answer)")
    b.set_xlabel("step")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "alignment.png", dpi=100)
    plt.close(fig)
    return out / "alignment.png"
