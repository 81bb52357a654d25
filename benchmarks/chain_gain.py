"""What each alignment stage adds, seed by seed: paired differences between the chain's models.

    python benchmarks/chain_gain.py --name default-3seeds
    python benchmarks/chain_gain.py --name align-vs-sft --side base

Reads the runs of one side of a seeded comparison (``python -m pipeline.compare --name NAME``:
the DVC experiments ``NAME-SIDE-s<seed>``, from ``dvc exp show``). Every run's evaluate
stage scored each model of its chain (pretrain, SFT, DPO, RL) on the same test questions, so
within a seed the models share everything upstream of the step between them and the
difference is that step's own. Per step (SFT -> DPO, DPO -> RL, SFT -> RL) and task: the
mean difference over the seeds, its 95% t interval and the paired t-test's p
(:func:`llmcore.report.compare.paired`). Test only reports here: no decision is read from it.

This is the step against *nothing*; whether the step beats SFT given the same minutes is a
comparison of its own (``--variant "dpo.max_steps=0 rl.max_steps=0 sft.max_steps=..."``).

Writes ``reports/compare/<NAME>-chain.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcore import metric_keys as keys  # noqa: E402
from llmcore.report.compare import ALPHA, paired, verdict  # noqa: E402
from pipeline.exp_queue import dvc, experiment_metrics  # noqa: E402

STEPS = (("sft", "dpo"), ("dpo", "rl"), ("sft", "rl"))
METRICS = (*keys.JUDGED, keys.DOCS_BPB)


def runs_of(name: str, side: str, show: list[dict]) -> dict[int, dict[str, float]]:
    """seed -> flat metrics of the experiments ``<name>-<side>-s<seed>`` in ``dvc exp show``."""
    pattern = re.compile(rf"{re.escape(name)}-{re.escape(side)}-s(\d+)")
    names = {n for b in show for e in (b.get("experiments") or [])
             for n in [e.get("name"), *(r.get("name") for r in e.get("revs") or [])]
             if n and pattern.fullmatch(n)}
    found = experiment_metrics(names, show)
    out = {}
    for exp_name, metrics in found.items():
        match = pattern.fullmatch(exp_name)
        if match:
            out[int(match.group(1))] = metrics
    return out


def chain_gain(runs: dict[int, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """step ("sft->rl") -> metric -> the paired difference (later model minus earlier)."""
    out: dict[str, dict[str, dict]] = {}
    for before, after in STEPS:
        step = out[f"{before}->{after}"] = {}
        for m in METRICS:
            a = {s: r.get(keys.model_metric(before, m)) for s, r in runs.items()}
            b = {s: r.get(keys.model_metric(after, m)) for s, r in runs.items()}
            test = paired(a, b)
            test["verdict"] = verdict(test, m.endswith("bpb"))
            step[m] = test
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="the seeded comparison's name")
    p.add_argument("--side", default="base", help="whose runs (default: the baseline)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "compare")
    args = p.parse_args(argv)
    show = json.loads(dvc("exp", "show", "--json", "--all-commits").stdout or "[]")
    runs = runs_of(args.name, args.side, show)
    if len(runs) < 2:
        raise SystemExit(f"chain_gain: {len(runs)} finished run(s) of {args.name}-{args.side}-s*;"
                         " a paired difference needs two seeds or more")
    result = {"name": args.name, "side": args.side, "seeds": sorted(runs), "alpha": ALPHA,
              "split": "test", "steps": chain_gain(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}-chain.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.name}-{args.side}, seeds {result['seeds']}: later model minus earlier, test")
    for step, metrics in result["steps"].items():
        for m, t in metrics.items():
            diff = "-" if t["diff"] is None else f"{t['diff']:+.3f}"
            lo, hi = t["ci95"]
            ci = "-" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
            pv = "-" if t["p"] is None else f"{t['p']:.3f}"
            print(f"  {step:8s} {m:28s} {diff:>7s} {ci:>18s} p {pv:>6s} {t['verdict']}")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
