"""Figures of the default run and its comparisons: the pipeline's minutes, the corpus, the
speedrun, the seeded comparisons' pace and findings."""

from __future__ import annotations

from pathlib import Path

from docs.figures import Read, figure, machine_kind, missing
from llmcore import metric_keys as keys


@figure("pipeline-minutes")
def pipeline_minutes(read: Read) -> str:
    """The committed default run: its stages' minutes and the machine they ran on."""
    from stages import chain  # the stages, as dvc.yaml declares them

    total, device = 0.0, None
    for stage in chain.stage_order(Path(__file__).resolve().parents[2]):
        data = read(f"metrics/{stage}.json")
        if not data or not isinstance(data.get(keys.stage_seconds(stage)), (int, float)):
            return missing(f"metrics/{stage}.json")
        total += data[keys.stage_seconds(stage)]
        device = device or data.get(f"{stage}/device")
    where = f" on a 2-core {machine_kind(device)}" if isinstance(device, str) else ""
    return f"about {total / 60:.0f} minutes of stages{where}"


@figure("quick-compare-minutes")
def quick_compare_minutes(read: Read) -> str:
    """The last quick comparison that was timed (``reports/compare/letters-quick.json``): its
    minutes, and the pace of 2 sides x 5 seeds from them."""
    rel = "reports/compare/letters-quick.json"
    data = read(rel)
    if not data or not data.get("seconds"):
        return missing(rel)
    runs = len(data["seeds"]) * len(data["sides"]) - len(data.get("missing") or [])
    return (f"{data['seconds'] / 60:.1f} min for {len(data['sides'])} sides x "
            f"{len(data['seeds'])} seeds ({runs} runs), so about "
            f"{data['seconds'] / runs * 10 / 60:.0f} min for 2 sides x 5 seeds")


@figure("quick-profile-tasks")
def quick_profile_tasks(read: Read) -> str:
    """What the quick profile measures of each task: the baseline's mean exact match on val
    in ``reports/compare/letters-quick.json`` (the committed params, quick profile)."""
    rel = "reports/compare/letters-quick.json"
    data = read(rel)
    if not data:
        return missing(rel)
    parts = []
    for task in ("arithmetic", "count", "spell", "reverse"):
        row = data["metrics"].get(keys.model_metric(keys.VAL, keys.exact_match(task)))
        if row is None or row["sides"]["base"]["mean"] is None:
            return missing(f"{rel}: {task}")
        parts.append(f"{task} {row['sides']['base']['mean']:.2f}")
    return (", ".join(parts) + f" on val (the committed params, mean of seeds "
            f"{', '.join(map(str, data['seeds']))})")


@figure("quick-600-reverse")
def quick_600_reverse(read: Read) -> str:
    """Reversal on val under the quick profile's earlier steps (200 + 600), over the seeds of
    ``reports/compare/letters-quick-600.json``: why its minutes moved to SFT."""
    rel = "reports/compare/letters-quick-600.json"
    data = read(rel)
    row = (data or {}).get("metrics", {}).get(
        keys.model_metric(keys.VAL, keys.exact_match("reverse")))
    if not row:
        return missing(rel)
    return f"{row['sides']['base']['mean']:.2f} over seeds {', '.join(map(str, data['seeds']))}"


@figure("speedrun-setup")
def speedrun_setup(read: Read) -> str:
    """How the committed speedrun ran: machine, preset, budget per side."""
    rel = "reports/speedrun.json"
    data = read(rel)
    if not data:
        return missing(rel)
    return (
        f"on a 2-core {machine_kind(data['machine'])} ({data['preset']}, "
        f"{data['budget_seconds']:.0f} s per side, one interleaved run, on the default "
        "shards, chat mix included)"
    )


@figure("speedrun-verdict")
def speedrun_verdict(read: Read) -> str:
    """The committed speedrun's outcome: lower bpb at every checkpoint or not, and the
    speed ratio (llmcore's tokens per second over the peer's)."""
    rel = "reports/speedrun.json"
    data = read(rel)
    if not data or "llmcore_lower_bpb_at_every_checkpoint" not in data:
        return missing(rel)
    lower = (
        "llmcore's held-out bpb is lower at every checkpoint"
        if data["llmcore_lower_bpb_at_every_checkpoint"]
        else "llmcore's held-out bpb is not lower at every checkpoint"
    )
    return f"{lower}, at {data['tokens_per_s_ratio']:.2f}x the peer's tokens per second"


@figure("chat-share-docs-bpb")
def chat_share_docs_bpb(read: Read) -> str:
    """Docs val bpb of the pretrained model without the chat mix, against the default, over
    the seeds of ``reports/compare/seeds-quick.json``."""
    rel = "reports/compare/seeds-quick.json"
    data = read(rel) or {}
    try:
        row = data["metrics"][keys.model_metric("pretrain", "val_bpb")]["against_baseline"][
            "pretrain-chat-share-0"
        ]
    except (KeyError, TypeError):
        return missing(rel)
    lo, hi = row["ci95"]
    return (
        f"{row['diff']:+.3f} bpb [{lo:.3f}, {hi:.3f}] without the chat mix, over "
        f"{len(data['seeds'])} seeds (verdict: {row['verdict']})"
    )


@figure("pretrain-budget")
def pretrain_budget(read: Read) -> str:
    """The FLOPs the default's pretraining spent (MFU x peak x its training seconds) and its
    minutes, from the committed ``metrics/pretrain.json``."""
    rel = "metrics/pretrain.json"
    m = read(rel) or {}
    mfu, peak, seconds = (m.get(keys.stage_metric("pretrain", k))
                          for k in ("mfu", "peak_flops", "train_seconds"))
    if not (isinstance(mfu, (int, float)) and isinstance(peak, (int, float))
            and isinstance(seconds, (int, float))):
        return missing(rel)
    flops, minutes = mfu * peak * seconds, seconds / 60
    return f"{flops:.1e}".replace("e+", "e") + f" FLOPs in {minutes:.1f} minutes of training"


@figure("sft-step-seconds")
def sft_step_seconds(read: Read) -> str:
    """Seconds per SFT step of the committed default run, and its machine."""
    rel = "metrics/sft.json"
    m = read(rel) or {}
    steps, seconds = m.get(keys.stage_metric("sft", "steps")), m.get(
        keys.stage_metric("sft", "train_seconds"))
    if not steps or not isinstance(seconds, (int, float)):
        return missing(rel)
    device = m.get(keys.stage_metric("sft", "device"), "machine")
    return f"about {seconds / steps:.2f} s on a 2-core {machine_kind(str(device))}"


@figure("corpus-size")
def corpus_size(read: Read) -> str:
    """The builtin corpus: bytes and documents (``metrics/fetch.json``)."""
    rel = "metrics/fetch.json"
    m = read(rel) or {}
    size, docs = (m.get(keys.stage_metric("fetch", k)) for k in ("bytes", "documents"))
    if not size or not isinstance(docs, int):
        return missing(rel)
    return f"about {size / 1e6:.1f} MB of English prose and code in {docs:,} documents"


@figure("rl-words-val")
def rl_words_val(read: Read) -> str:
    """GRPO on compounds against GRPO on the training words, on val, seed by seed
    (``reports/compare/rl-words.json``): each task's means and the paired difference."""
    rel = "reports/compare/rl-words.json"
    data = read(rel)
    if not data:
        return missing(rel)
    parts = []
    for task, kind in (("arithmetic", None), ("count", None), ("spell", keys.MULTI),
                       ("reverse", keys.MULTI)):
        row = data["metrics"].get(keys.model_metric(keys.VAL, keys.exact_match(task, kind)))
        if row is None or "compounds" not in row["sides"]:
            return missing(f"{rel}: {task}")
        base, var = row["sides"]["base"]["mean"], row["sides"]["compounds"]["mean"]
        paired = row["against_baseline"]["compounds"].get("paired") or {}
        p = paired.get("p")
        parts.append(f"{task}{' (words of several tokens)' if kind else ''} {base:.2f} -> "
                     f"{var:.2f}" + (f" (paired p {p:.2f})" if p is not None else ""))
    return "; ".join(parts) + f" (seeds {', '.join(map(str, data['seeds']))})"
