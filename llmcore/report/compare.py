"""Comparing a baseline with variants over several seeds: intervals, differences, p-values.

One run per side tells nothing when the difference is inside the seed-to-seed spread. With N
seeds per side, each metric gets, per side, the mean, the sample standard deviation and a 95%
interval of the mean (Student's t with N - 1 degrees of freedom); per variant, the difference
to the baseline with its 95% interval and the two-sided p-value of Welch's t-test (unequal
variances, Welch-Satterthwaite degrees of freedom; scipy computes both), and a verdict. Where
both sides ran the same seeds, the difference is also tested seed by seed (a paired t-test):
the sides of one seed share every stage upstream of the change, so the seed's own luck
cancels and a smaller effect shows.

Trade-offs: a t-test assumes roughly normal means, which five seeds cannot check; with
identical values on both sides (a metric the change cannot move) the test is undefined and
the p-value is reported as None. No correction for testing several metrics is applied: with
six metrics at p < 0.05 about one in four comparisons of two identical recipes shows a
"difference" somewhere, so the verdict asks for p < 0.01.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from scipy import stats

ALPHA = 0.01  # the verdict's threshold (see the trade-offs above)


class SideStats(TypedDict):
    """One side's values of a metric (:func:`describe`); None where it is undefined."""

    n: int
    mean: float | None
    sd: float | None
    ci95: list[float | None]
    values: list[float]


class _Difference(TypedDict):
    diff: float | None
    ci95: list[float | None]
    p: float | None


class _Paired(_Difference):
    seeds: list[int]


class _Welch(_Difference):
    df: float | None


class PairedTest(_Paired, total=False):
    """The variant minus the baseline seed by seed (:func:`paired`); ``verdict`` is added by
    :func:`compare`. (``total=False`` makes only the keys declared here optional.)"""

    verdict: str


class WelchTest(_Welch, total=False):
    """The difference of the sides' means (:func:`welch`); ``verdict`` and ``paired`` are
    added by :func:`compare`."""

    verdict: str
    paired: PairedTest


class MetricComparison(TypedDict):
    """One metric of :func:`compare`: each side's values, and each non-baseline side's tests
    against the baseline."""

    sides: dict[str, SideStats]
    lower_is_better: bool
    against_baseline: dict[str, WelchTest]


class RunFigures(TypedDict):
    """One run of a comparison: its seed, where its figures were read (``experiment``: the
    DVC experiment store; ``report``: an earlier report of the comparison), and the figures."""

    seed: int
    source: str
    metrics: dict[str, float]


class Comparison(TypedDict, total=False):
    """What :func:`compare` gives (``baseline``, ``alpha``, ``metrics``), and what a
    comparison's JSON adds to it (``pipeline.compare``: the sides, seeds, the reported table)."""

    baseline: str
    alpha: float
    metrics: dict[str, MetricComparison]
    name: str
    profile: str
    profile_overrides: list[str]  # what the profile set when it ran (profiles change)
    seeds: list[int]
    sides: dict[str, str]
    missing: list[str]
    seconds: float | None
    reported: dict[str, MetricComparison]
    runs: dict[str, RunFigures]


def describe(values: Sequence[float | None]) -> SideStats:
    """Mean, sample standard deviation and the 95% t interval of the mean of ``values``."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": [None, None], "values": []}
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": _num(sd), "ci95": [_num(mean - half), _num(mean + half)],
            "values": x.tolist()}


def welch(base: Sequence[float | None], variant: Sequence[float | None]) -> WelchTest:
    """Difference of means (variant - base), its 95% Welch interval and Welch's p-value."""
    a, b = (np.asarray([v for v in s if v is not None and not math.isnan(v)], dtype=float)
            for s in (base, variant))
    if len(a) < 2 or len(b) < 2:
        return {"diff": None, "ci95": [None, None], "p": None, "df": None}
    diff = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "p": None, "df": None}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    with warnings.catch_warnings():  # near-identical sides: scipy warns, the p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    return {"diff": diff, "ci95": [diff - half, diff + half], "p": p, "df": float(df)}


def paired(base: dict[int, float | None], variant: dict[int, float | None]) -> PairedTest:
    """The variant minus the baseline seed by seed (the seeds both sides ran): the mean
    difference, its 95% interval and the paired t-test's p. Apt where a seed's two sides
    share their upstream stages (DVC's cache), so that the seed's own luck cancels."""
    seeds = sorted(s for s in base.keys() & variant.keys()
                   if base[s] is not None and variant[s] is not None)
    d = np.asarray([float(variant[s]) - float(base[s]) for s in seeds])  # type: ignore[arg-type]
    if len(d) < 2:
        return {"diff": None, "ci95": [None, None], "p": None, "seeds": seeds}
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-9 * max(1.0, abs(mean)):
        # every seed moved by the same amount (0.016 is four questions of 250 each time):
        # the t statistic is undefined, and float rounding must not turn it into p = 0
        return {"diff": mean, "ci95": [mean, mean], "p": None, "seeds": seeds}
    half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
    with warnings.catch_warnings():  # near-identical differences: scipy warns, p still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return {"diff": mean, "ci95": [mean - half, mean + half], "p": p, "seeds": seeds}


def verdict(test: WelchTest | PairedTest, lower_is_better: bool) -> str:
    """``better`` / ``worse`` where p < ALPHA, else ``no detectable difference``; ``too few
    seeds`` where there is no difference to test (under two seeds on a side, or in common)."""
    if test["diff"] is None:
        return "too few seeds"
    if test["p"] is None or test["p"] >= ALPHA:
        return "no detectable difference"
    better = test["diff"] < 0 if lower_is_better else test["diff"] > 0
    return "better" if better else "worse"


def lower_is_better(metric: str) -> bool:
    """Losses and bits per byte go down; accuracies and rewards go up."""
    name = metric.rsplit("/", 1)[-1]
    return any(k in name for k in ("bpb", "loss", "seconds", "perplexity"))


def compare(runs: dict[str, dict[int, dict[str, float]]], baseline: str,
            metrics: Sequence[str]) -> Comparison:
    """``runs``: side -> seed -> flat metrics. Every side against ``baseline`` per metric."""
    out: Comparison = {"baseline": baseline, "alpha": ALPHA, "metrics": {}}
    for m in metrics:
        sides = {side: describe([r.get(m) for r in seeds.values()])
                 for side, seeds in runs.items()}
        entry: MetricComparison = {"sides": sides, "lower_is_better": lower_is_better(m),
                                 "against_baseline": {}}
        for side, seeds in runs.items():
            if side == baseline:
                continue
            test = welch(sides[baseline]["values"], sides[side]["values"])
            test["verdict"] = verdict(test, entry["lower_is_better"])
            by_seed = paired({k: r.get(m) for k, r in runs[baseline].items()},
                             {k: r.get(m) for k, r in seeds.items()})
            by_seed["verdict"] = verdict(by_seed, entry["lower_is_better"])
            test["paired"] = by_seed
            entry["against_baseline"][side] = test
        out["metrics"][m] = entry
    return out


def markdown(result: Comparison) -> str:
    """One table row per metric and side: mean +- sd [95% interval], difference, p, verdict."""
    lines = ["| metric | side | seeds | mean +- sd | 95% interval | difference [95%] | p (Welch) "
             "| verdict | p (paired by seed) | verdict (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in result["metrics"].items():
        for side, d in e["sides"].items():
            t = e["against_baseline"].get(side)
            diff = ("" if t is None or t["diff"] is None else
                    f"{t['diff']:+.4f} [{_f(t['ci95'][0])}, {_f(t['ci95'][1])}]")
            p = "" if t is None else ("n/a" if t["p"] is None else f"{t['p']:.3g}")
            pt = None if t is None else t.get("paired")
            pp = "" if pt is None else ("n/a" if pt["p"] is None else f"{pt['p']:.3g}")
            lines.append(f"| {m} | {side} | {d['n']} | {_f(d['mean'])} +- {_f(d['sd'])} | "
                         f"[{_f(d['ci95'][0])}, {_f(d['ci95'][1])}] | {diff} | {p} | "
                         f"{'' if t is None else t['verdict']} | {pp} | "
                         f"{'' if pt is None else pt['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(result: Comparison, path: Path) -> Path:
    """One panel per metric, each seed a dot, each side's mean with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(result["metrics"])
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    rng = np.random.default_rng(0)  # horizontal jitter only, so equal values stay visible
    for ax, m in zip(axes.flat, metrics, strict=False):
        e = result["metrics"][m]
        for i, d in enumerate(e["sides"].values()):
            xs = i + rng.uniform(-0.08, 0.08, len(d["values"]))
            ax.plot(xs, d["values"], "o", alpha=0.6)
            mean, (lo, hi) = d["mean"], d["ci95"]
            if mean is not None and lo is not None and hi is not None:
                ax.errorbar([i + 0.25], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s",
                            color="black", capsize=3)
        ax.set_xticks(range(len(e["sides"])), list(e["sides"]), fontsize=7, rotation=25,
                      ha="right")
        tests = e["against_baseline"]
        ps = ", ".join(f"p={t['p']:.2g}" for t in tests.values() if t["p"] is not None)
        ax.set_title(f"{m}\n{ps}", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
