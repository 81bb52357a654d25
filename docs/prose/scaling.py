"""Figures of the scaling study (``reports/scaling/``): the recipe's sweep, the grid's
vocabularies and shapes, its fits."""

from __future__ import annotations

from docs.figures import Read, figure, missing


@figure("scaling-sweep")
def scaling_sweep(read: Read) -> str:
    """The pretraining recipe's sweep: the tagged runs of ``reports/scaling/runs.jsonl`` (one
    change per run against the default shape and budget), best docs val bpb bold."""
    rel = "reports/scaling/runs.jsonl"
    data = read(rel)
    rows = [r for r in (data or {}).get("rows", []) if r.get("tag")]
    if not rows:
        return missing(rel)
    best = min(r["best_val_bpb"] for r in rows)
    out = ["", "| change | lr | rows per step | docs val bpb |", "|---|---|---|---|"]
    for r in rows:
        bpb = f"{r['best_val_bpb']:.3f}"
        out.append(
            f"| `{r['tag']}` | {r['lr']:g} | {r['batch_size']} | "
            + (f"**{bpb}** |" if r["best_val_bpb"] == best else f"{bpb} |")
        )
    return "\n".join(out) + "\n"


def _grid(read: Read) -> dict[tuple[int, str, float], float] | None:
    """(vocab, shape, budget) -> best docs val bpb of the scaling grid's runs (untagged)."""
    data = read("reports/scaling/runs.jsonl")
    if not data:
        return None
    return {
        (r["vocab"], r["shape"], float(r["budget"])): r["best_val_bpb"]
        for r in data.get("rows", [])
        if not r.get("tag")
    }


@figure("scaling-vocab")
def scaling_vocab(read: Read) -> str:
    """Docs val bpb of vocabularies 2048 / 4096 / 6400 at 1e13 FLOPs, per shape of the grid."""
    grid = _grid(read)
    parts = []
    for shape in ("4x64", "4x96", "4x128"):
        bpb = [(grid or {}).get((v, shape, 1e13)) for v in (2048, 4096, 6400)]
        if None in bpb:
            return missing("reports/scaling/runs.jsonl")
        parts.append(" / ".join(f"{b:.3f}" for b in bpb) + f" ({shape.replace('x', ' x ')})")
    return "docs val bpb " + ", ".join(parts)


@figure("scaling-shape")
def scaling_shape(read: Read) -> str:
    """Docs val bpb of the grid's shapes at vocabulary 4096 and 1e13 FLOPs, best first."""
    grid = _grid(read)
    runs = sorted(
        (b, shape)
        for (v, shape, f), b in (grid or {}).items()
        if v == 4096 and f == 1e13 and shape in ("2x64", "4x64", "4x96", "4x128")
    )
    if len(runs) < 4:
        return missing("reports/scaling/runs.jsonl")
    (best, name), rest = runs[0], runs[1:]
    return f"{name.replace('x', ' x ')}: {best:.3f}; " + ", ".join(
        f"{s.replace('x', ' x ')} {b:.3f}" for b, s in rest
    )


def _runs(read: Read) -> list[dict]:
    return [r for r in (read("reports/scaling/runs.jsonl") or {}).get("rows", []) if not r.get("tag")]


def _sci(x: float) -> str:
    return f"{x:.0e}".replace("e+", "e")


def _shape(name: str) -> str:
    return name.replace("x", " x ")


@figure("scaling-grid-hours")
def scaling_grid_hours(read: Read) -> str:
    """The training time of the grid's runs, and the machine (``reports/scaling/scaling.json``)."""
    runs, meta = _runs(read), read("reports/scaling/scaling.json")
    if not runs or not meta:
        return missing("reports/scaling/runs.jsonl")
    timed = [r["seconds"] for r in runs if isinstance(r.get("seconds"), (int, float))]
    hours = sum(timed) / 3600
    return (f"{len(runs)} runs, {len(timed)} of them timed: {hours:.1f} hours of training on a 2-core "
            f"{meta['machine'].split(',')[0]}")


@figure("scaling-turned-up")
def scaling_turned_up(read: Read) -> str:
    """The grid's runs whose last evaluation was worse than their best: which, after how many
    epochs, by how much."""
    up = sorted((r for r in _runs(read) if r["val_turned_up"]), key=lambda r: r["epochs"])
    if not up:
        return "no run ended worse than its best evaluation"
    worse = [r["final_val_bpb"] - r["best_val_bpb"] for r in up]
    runs = ", ".join(f"{_shape(r['shape'])} at vocabulary {r['vocab']} and {_sci(r['budget'])} "
                     f"FLOPs ({r['epochs']:.1f} epochs)" for r in up)
    return f"{runs} did, by {min(worse):.4f} to {max(worse):.4f} bpb"


@figure("scaling-fit-miss")
def scaling_fit_miss(read: Read) -> str:
    """How far the isoFLOP parabola's minimum is from the best run at vocabulary 4096, 1e13."""
    rel = "reports/scaling/scaling.json"
    try:
        fit = (read(rel) or {})["fits"]["4096"]["budgets"]["1e+13"]
    except KeyError:
        return missing(rel)
    return (f"by {abs(fit['optimal_bpb'] - fit['best_run_bpb']):.3f} bpb (fitted "
            f"{fit['optimal_bpb']:.3f}, measured {fit['best_run_bpb']:.3f})")


@figure("scaling-gflops")
def scaling_gflops(read: Read) -> str:
    """Achieved GFLOP/s of 4 x 64 and 4 x 128 (vocabulary 4096, 1e13 FLOPs) on the grid's
    machine: what a smaller shape loses on two cores."""
    speed = {r["shape"]: r["achieved_gflops"] for r in _runs(read)
             if r["vocab"] == 4096 and r["budget"] == 1e13}
    if "4x64" not in speed or "4x128" not in speed:
        return missing("reports/scaling/runs.jsonl")
    return f"{speed['4x64']:.0f} against {speed['4x128']:.0f} GFLOP/s"


@figure("attention-share")
def attention_share(read: Read) -> str:
    """Attention's share of a training token's FLOPs at the default shape and sequence length:
    what is left of the counted FLOPs after six times the matmul weights (blocks and head)."""
    rows = [r for r in _runs(read) if r["shape"] == "4x128" and r["vocab"] == 4096]
    if not rows:
        return missing("reports/scaling/runs.jsonl")
    r = rows[0]
    matmul = 6 * (r["non_embedding_params"] + r["vocab"] * r["d_model"])
    return f"about {(r['flops_per_token'] - matmul) / r['flops_per_token']:.0%} of the FLOPs"
