"""Comparisons over seeds (``python -m pipeline.compare``, ``benchmarks/chain_gain.py``): each
side's mean and spread, the differences with their tests, and the committed params' own
figures over seeds, on the results page and in the README."""

from __future__ import annotations

from pathlib import Path

from docs.tables.base import Files, Json, minutes, missing, num, table
from llmcore import metric_keys as keys

# the committed params over seeds: a comparison's file and the side whose runs had exactly
# these params (the baseline of a default run alone, or the variant a comparison adopted),
# and the command that made it
# the default over seeds: the side whose runs trained as the committed params do, on the
# machine of the committed run
SEEDED_DEFAULT = "reports/compare/rl-words.json"
SEEDED_SIDE = "compounds"
SEEDED_COMMAND = ("python -m pipeline.compare --name rl-words --profile full --seed-list "
                  "1337,1,2 --variant \"compounds: rl.words=compounds\"")
SEEDED_RUNS = ("which trained as the committed params do, on the machine kind of the "
               "committed run")
# what the default is judged on (spell and reverse on their words of several tokens)
JUDGED = keys.JUDGED


def _interval(metric: str, lo: float | None, hi: float | None) -> str:
    """``[lo, hi]``; a share's t interval clipped to [0, 1] (with three seeds it can pass 0)."""
    if lo is None or hi is None:
        return "-"
    if metric.endswith(("exact_match", "accuracy")):
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"[{lo:.3f}, {hi:.3f}]"


def default_seeded(files: Files) -> list[str]:
    """The results page's section on the committed params over seeds: val (what decisions
    read) and the final model on test (what the default is judged on), each seed's value."""
    data = files.get(SEEDED_DEFAULT)
    if data is None or not data.get("reported"):
        return missing(SEEDED_DEFAULT, f"`{SEEDED_COMMAND}`")
    out = [f"`{SEEDED_DEFAULT}` (`{SEEDED_COMMAND}`; side `{SEEDED_SIDE}`, {SEEDED_RUNS}): "
           "one run per seed, as DVC experiments. The seed changes "
           "initialisation, data order and sampling, never the corpus or a held-out set; "
           f"the intervals are Student's t over the seeds {data.get('seeds')}, so with three "
           "seeds they are wide.", "", "Val, what a decision reads:", ""]
    out += _alone_rows(data.get("metrics", {}), SEEDED_SIDE)
    out += ["The final model on test, what the default is judged on:", ""]
    out += _alone_rows(data["reported"], SEEDED_SIDE)
    chain = SEEDED_DEFAULT.replace(".json", "-chain.json")
    return out + ["What each alignment stage adds to the model before it, seed by seed on test "
                  f"(`{chain}`, `python benchmarks/chain_gain.py --name "
                  f"{data.get('name')} --side {SEEDED_SIDE}`): the step against nothing, not "
                  "against SFT given the same minutes.", ""]


def default_over_seeds(files: Files) -> list[str]:
    """The README's line on the default over seeds: the final model's test figures (mean and
    the 95% interval of the mean), linking the full table."""
    data = files.get(SEEDED_DEFAULT)
    if data is None or not data.get("reported"):
        return missing(SEEDED_DEFAULT, f"`{SEEDED_COMMAND}`")
    rows = []
    for metric, e in data["reported"].items():
        d = e["sides"].get(SEEDED_SIDE, {})
        lo, hi = d.get("ci95") or [None, None]
        if d.get("mean") is None or metric.rsplit("/", 1)[-1] not in JUDGED:
            continue
        rows.append([metric.removeprefix("evaluate/final/"), f"{d['mean']:.3f}",
                     _interval(metric, lo, hi),
                     ", ".join(f"{v:.3f}" for v in d["values"])])
    return [f"The same run over seeds {data.get('seeds')} (the final model on test; "
            "[the table with val](docs/results.md#the-default-over-seeds), "
            f"`{SEEDED_DEFAULT}`):", ""] + table(
        ["metric", "mean", "95% interval of the mean (t, clipped to [0, 1])", "per seed"], rows)


def seeded(files: Files, rel: str) -> list[str]:
    """A seeded comparison (``python -m pipeline.compare``): per variant, per metric, both
    sides' mean +- sd over the seeds, the difference with its 95% interval, Welch's p and the
    verdict."""
    data = files.get(rel)
    if data is None:
        return missing(rel, f"`python -m pipeline.compare --name {Path(rel).stem} ...`")
    sides = data.get("sides", {})
    took = ("" if data.get("seconds") is None else
            f", {minutes(data.get('seconds'))} for every run of every side")
    base = sides.get("base") or ""
    if " side of comparison " in base:  # --base-from NAME --base-side SIDE: runs reused
        base = f"{base} (its runs, reused)"
    else:
        base = "the params as committed when it ran" + (f" with `{base}`" if base else "")
    steps = [o for o in data.get("profile_overrides") or [] if ".max_steps=" in o]
    out = [f"Profile `{data.get('profile')}`" + (f" (`{' '.join(steps)}`)" if steps else "")
           + f", seeds {data.get('seeds')}, {len(sides)} sides"
           f"{took}; verdicts at p < {data.get('alpha')}. Baseline: {base}.", ""]
    tables = [("", data.get("metrics", {}))]
    if data.get("reported"):
        tables = [("decided on val: ", data["metrics"]),
                  ("reported, the final model on test (not for decisions): ", data["reported"])]
    if len(sides) == 1:  # the baseline alone: what a default scores over seeds
        for label, metrics in tables:
            out += [f"The committed params{', ' + label[:-2] if label else ''}:", ""]
            out += _alone_rows(metrics)
    for side, overrides in sides.items():
        if side == "base":
            continue
        for label, metrics in tables:
            out += [f"**`{overrides}`** against the baseline" + (f", {label}" if label
                                                                  else ":"), ""]
            out += _seeded_rows(metrics, side)
    return out


def seeded_section(files: Files, name: str, alt: str) -> list[str]:
    """The tables of ``reports/compare/<name>.json`` and its plot, when there is one."""
    out = seeded(files, f"reports/compare/{name}.json")
    if (files.root / f"reports/compare/{name}.png").exists():
        out += [f"![{alt}](../reports/compare/{name}.png)", ""]
    return out


def chain_gain(files: Files, rel: str) -> list[str]:
    """Per step of the chain and metric: the paired difference over seeds (later model minus
    earlier), its 95% interval, p and verdict (``benchmarks/chain_gain.py``)."""
    data = files.get(rel)
    if data is None:
        return missing(rel, "`python benchmarks/chain_gain.py --name default-3seeds`")
    rows = []
    for step, metrics in data.get("steps", {}).items():
        for metric, t in metrics.items():
            lo, hi = t.get("ci95") or [None, None]
            rows.append([step.replace("->", " -> "), f"`{metric}`",
                         "-" if t.get("diff") is None else f"{t['diff']:+.3f}",
                         "-" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]",
                         "-" if t.get("p") is None else f"{t['p']:.3f}", t.get("verdict", "")])
    return [f"Seeds {data.get('seeds')}, verdicts at p < {data.get('alpha')}:", ""] + table(
        ["step", "metric", "mean difference", "95% interval", "p (paired)", "verdict"], rows)


def _alone_rows(metrics: Json, side: str = "base") -> list[str]:
    """One side over its seeds: mean +- sd, the 95% t interval of the mean, each seed's value."""
    rows = []
    for metric, e in metrics.items():
        d = e["sides"].get(side, {})
        lo, hi = d.get("ci95") or [None, None]
        rows.append([f"`{metric}`", str(d.get("n", 0)),
                     "-" if d.get("mean") is None else f"{d['mean']:.3f} +- {d['sd']:.3f}",
                     _interval(metric, lo, hi),
                     ", ".join(f"{v:.3f}" for v in d.get("values", []))])
    return table(["metric", "seeds", "mean +- sd", "95% interval of the mean", "per seed"],
                 rows)


def _seeded_rows(metrics: Json, side: str) -> list[str]:
    def ms(d: Json) -> str:
        return "-" if d.get("mean") is None else \
            f"{d['mean']:.3f} +- {d['sd'] if d.get('sd') is not None else float('nan'):.3f}"

    rows, paired = [], any("paired" in e["against_baseline"].get(side, {})
                           for e in metrics.values())
    for metric, e in metrics.items():
        b, v = e["sides"].get("base", {}), e["sides"].get(side, {})
        t = e["against_baseline"].get(side, {})
        ci = t.get("ci95") or [None, None]
        diff = "-" if t.get("diff") is None else f"{t['diff']:+.3f} [{num(ci[0])}, {num(ci[1])}]"
        p = "-" if t.get("p") is None else f"{t['p']:.2g}"
        row = [metric, ms(b), ms(v), diff, p, t.get("verdict", "-")]
        if paired:
            pt = t.get("paired") or {}
            row += ["-" if pt.get("p") is None else f"{pt['p']:.2g}", pt.get("verdict", "-")]
        rows.append(row)
    head = ["metric", "baseline", "variant", "difference [95%]", "p (Welch)", "verdict"]
    return table(head + (["p (paired by seed)", "verdict (paired)"] if paired else []), rows)

