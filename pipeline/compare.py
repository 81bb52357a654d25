"""Seeds and significance: a baseline and its variants, each over N seeds, as DVC experiments.

    python -m pipeline.compare --variant model.positions=learned --seeds 5
    make compare VARIANT="model.positions=learned" SEEDS=5

Every (side, seed) is one ``dvc exp run --queue`` experiment named ``<name>-<side>-s<seed>``
(``-S base.seed=<seed>``, the profile's overrides, the side's own), queued seed by seed so
that a comparison stopped early is still balanced. ``dvc queue start`` runs them one at a
time (``--jobs`` for more: each is a full training); DVC's run cache restores the stages that
no override touches (fetch, tokenizer, pack). When the queue is done, the metrics of every
experiment (``dvc exp show --json``) are compared by :mod:`llmcore.report.compare` and written
to ``reports/compare/<name>.{json,md,png}``. ``--report-only`` compares experiments that ran
before, by name. The report keeps every run's figures (``runs``), so ``--extend`` adds seeds to
a comparison whose experiments are gone (another checkout, another machine): the runs the
report holds are read from it, only the others run. ``--base-from NAME`` likewise reads the
baseline from NAME's experiments, or from its report where they are gone.

Profiles: ``quick`` (a short pretraining and SFT, alignment skipped, 100 questions per task,
no MLflow runs: a few minutes a run on 2 cores, see docs/experiments.md) and
``full`` (the committed params). A variant is one or more ``key=value`` overrides separated by
spaces: ``--variant "pretrain.optimizer=adamw pretrain.lr=0.003"``. Without a variant the
baseline runs alone: its mean and interval over the seeds (the table a default is judged on).

A comparison decides between recipes, so its verdicts read the val split: the training
stages' held-out bpb and the final model's exact match on the val task questions
(``evaluate/val/...``, multi-token words apart). A second table reports the final model
(the last of the chain a run scored: ``rl``, or ``sft`` in the quick profile) on test, to
quote a choice once it is made (``--report``).

The seed changes everything random in training (initialisation, data order, dropout, DPO and
GRPO sampling) and nothing else: the corpus, the tokenizer, the shards and every held-out set
do not depend on ``base.seed``, so the sides are scored on the same questions.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from llmcore import metric_keys as keys
from llmcore.report.compare import Comparison, compare, markdown, plot
from pipeline.exp_queue import collect, queue, taken, wait
from stages import chain

ROOT = Path(__file__).resolve().parents[1]
# quick: the tasks emerge late in SFT, so its minutes go there (on val, seed 1: 200
# pretraining + 600 SFT steps left reversal at 0.08, over seeds 1-3 at 0.09; 100 + 700, for
# 11 s more a run, took every task past 0.24); only the SFT model is scored, the one a quick
# comparison reads. Its pretraining is short: a switch of pretraining alone wants `full`.
PROFILES: dict[str, list[str]] = {
    "quick": ["pretrain.max_steps=100", "pretrain.eval_every=50", "sft.max_steps=700",
              "sft.eval_every=350", "dpo.max_steps=0", "rl.max_steps=0",
              "evaluate.max_task_examples=100", "evaluate.context_factors=[1]",
              "evaluate.models=[sft]",
              "base.tracking=none"],
    "full": [],
}
# a comparison is a decision: it reads val (the training stages' held-out bpb and the final
# model's task questions of the val split, which the evaluate stage scores for this)
METRICS = ["pretrain/val_bpb", "sft/val_bpb",
           *(keys.model_metric(keys.VAL, keys.exact_match(t, kind))
             for t, kind in (("arithmetic", None), ("count", None), ("spell", None),
                             ("spell", keys.MULTI), ("reverse", None),
                             ("reverse", keys.MULTI)))]
# ...and reports the final model (the last of the chain each run scored) on test, in a table
# of its own: figures to quote once a choice is made, never to make it
REPORTED = [keys.DOCS_BPB, keys.exact_match("arithmetic"), keys.exact_match("count"),
            keys.exact_match("spell"), keys.exact_match("spell", keys.MULTI),
            keys.exact_match("reverse"), keys.exact_match("reverse", keys.MULTI),
            "doc_mc_accuracy"]
CHAIN = tuple(chain.models(ROOT))  # the training stages, in order (dvc.yaml declares them)


def side_name(variant: str) -> str:
    """A short name for a variant's overrides: ``model.positions=learned`` -> ``positions-learned``."""
    parts = []
    for o in variant.split():
        key, _, value = o.partition("=")
        parts.append(re.sub(r"[^A-Za-z0-9.]+", "-", f"{key.split('.')[-1]}-{value}").strip("-."))
    return "-".join(parts)[:40] or "variant"


def plan(args: argparse.Namespace) -> list[tuple[str, int, list[str]]]:
    """(experiment name, seed, overrides) of every run, seed by seed."""
    sides = {"base": args.baseline.split() if args.baseline else []}
    for v in args.variant:
        name, overrides = variant_side(v)
        if name in sides:
            raise SystemExit(f"compare: two sides named {name!r}; give distinct variants")
        sides[name] = overrides
    for overrides in sides.values():
        for o in overrides:
            if "=" not in o:
                raise SystemExit(f"compare: an override is key=value (got {o!r})")
    return [(f"{base_prefix(args)}-{args.base_side}-s{seed}" if side == "base"
             else f"{args.name}-{side}-s{seed}", seed,
             [f"base.seed={seed}", *PROFILES[args.profile], *overrides])
            for seed in args.seed_list for side, overrides in sides.items()]


def base_prefix(args: argparse.Namespace) -> str:
    """The comparison whose baseline runs this one reads: its own, or ``--base-from``'s."""
    return args.base_from or args.name


def is_base(args: argparse.Namespace, name: str) -> bool:
    return name.startswith(f"{base_prefix(args)}-{args.base_side}-s")


def variant_side(variant: str) -> tuple[str, list[str]]:
    """(side name, overrides) of ``--variant``: ``LABEL: key=value ...`` names the side
    (``first-fit:`` alone: the workspace as it is, for a change of code rather than of
    params); otherwise the name comes from the overrides."""
    label, colon, rest = variant.partition(":")
    if colon and "=" not in label:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label.strip()):
            raise SystemExit(f"compare: side label {label!r}: letters, digits, '.', '_', '-'")
        return label.strip(), rest.split()
    return side_name(variant), variant.split()


def recorded(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name -> figures of the runs that ``reports/compare/<name>.json`` holds, for
    ``--extend``. The report must be of the same comparison (profile and every side's
    overrides), or its runs would be another recipe's. A report written before reports kept
    ``runs`` gives them back from its per-side values, which follow the seed order of its
    plan with the missing runs left out."""
    path = ROOT / "reports" / "compare" / f"{args.name}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    sides = {"base": args.baseline or "", **{variant_side(v)[0]: v for v in args.variant}}
    if old.get("profile") != args.profile or any(
            old["sides"].get(k, v) != v for k, v in sides.items()):
        raise SystemExit(f"compare: --extend: {path} is another comparison (profile "
                         f"{old.get('profile')!r}, sides {old['sides']}); give the same "
                         "profile and variants, or another --name")
    other_profile(old, args, f"--extend: {path}")
    if "runs" in old:
        return {n: r["metrics"] for n, r in old["runs"].items()}
    args_then = argparse.Namespace(**{**vars(args), "seed_list": old["seeds"]})
    out: dict[str, dict[str, Any]] = {}
    for side in old["sides"]:
        names = [n for n, _, _ in plan(args_then)
                 if (is_base(args, n) if side == "base" else n.startswith(f"{args.name}-{side}-s"))
                 and n not in old["missing"]]
        for table in (old["metrics"], old["reported"]):
            for key, row in table.items():
                values = row["sides"].get(side, {}).get("values", [])
                if len(values) != len(names):
                    raise SystemExit(f"compare: --extend: {path} has {len(values)} values of "
                                     f"{key} for side {side}, its plan {len(names)} runs")
                for name, value in zip(names, values, strict=True):
                    out.setdefault(name, {})[key] = value
    return out


# what the profiles set before reports recorded it (their ``profile_overrides``)
UNRECORDED = {"full": [],
              "quick": ["pretrain.max_steps=200", "pretrain.eval_every=100",
                        "sft.max_steps=400", "sft.eval_every=200", "dpo.max_steps=0",
                        "rl.max_steps=0", "evaluate.max_task_examples=100",
                        "evaluate.context_factors=[1]", "evaluate.models=[pretrain,sft]",
                        "base.tracking=none"]}


def other_profile(old: dict[str, Any], args: argparse.Namespace, what: str) -> None:
    """Stop when ``old`` (a report) ran its profile with other overrides than the profile
    has today: a profile's definition changes, and its runs would then be another recipe's."""
    then = old.get("profile_overrides", UNRECORDED.get(args.profile))
    if then != PROFILES[args.profile]:
        raise SystemExit(
            f"compare: {what} ran profile {args.profile!r} as {' '.join(then or [])!r}, "
            f"today it is {' '.join(PROFILES[args.profile])!r}; its runs are another "
            "recipe's: run the comparison again under another --name")


def recorded_base(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name -> figures of the baseline runs that ``--base-from NAME``'s report holds: its
    experiments may be gone (another checkout), its figures are not. The report must be of
    the same profile, or its baseline would be another recipe."""
    path = ROOT / "reports" / "compare" / f"{args.base_from}.json"
    if not args.base_from or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("profile") != args.profile:
        raise SystemExit(f"compare: --base-from {args.base_from}: {path} ran profile "
                         f"{old.get('profile')!r}, this comparison {args.profile!r}")
    other_profile(old, args, f"--base-from {args.base_from}: {path}")
    return {n: r["metrics"] for n, r in old.get("runs", {}).items() if is_base(args, n)}


def final_model(metrics: dict[str, Any]) -> dict[str, Any]:
    """``evaluate/final/<metric>``: the run's last scored model of the chain (rl in the full
    profile, sft in the quick one), so that sides of any profile report the same model."""
    scored = [m for m in CHAIN if keys.model_metric(m, keys.DOCS_BPB) in metrics]
    if not scored:
        return {}
    prefix = keys.model_metric(scored[-1], "")
    return {keys.model_metric(keys.FINAL, k[len(prefix):]): v for k, v in metrics.items()
            if k.startswith(prefix)}


def report(args: argparse.Namespace, runs: list[tuple[str, int, list[str]]],
           seconds: float | None, earlier: dict[str, dict[str, Any]] | None = None) -> Path:
    """Compare the finished runs (and, with ``--extend``, the ``earlier`` ones a previous
    report holds) and write the report."""
    found = collect({n for n, _, _ in runs})
    for name, metrics in (earlier or {}).items():
        found.setdefault(name, dict(metrics))
    by_side: dict[str, dict[int, dict[str, Any]]] = {}
    for name, seed, _ in runs:
        side = "base" if is_base(args, name) else name[len(args.name) + 1 : name.rindex("-s")]
        if name in found:
            by_side.setdefault(side, {})[seed] = found[name]
    missing = [n for n, _, _ in runs if n not in found]
    if "base" not in by_side:
        raise SystemExit(f"compare: no finished baseline run among "
                         f"{base_prefix(args)}-{args.base_side}-s*; "
                         "see `dvc queue status`")
    for seeds in by_side.values():
        for metrics in seeds.values():
            metrics.update(final_model(metrics))
    reported = compare(by_side, "base", [keys.model_metric(keys.FINAL, m) for m in args.report])
    names = [*args.metric, *(keys.model_metric(keys.FINAL, m) for m in args.report)]
    base = (f"the {args.base_side} side of comparison {args.base_from}" if args.base_from
            else args.baseline)
    result: Comparison = {
        **compare(by_side, "base", args.metric), "name": args.name, "profile": args.profile,
        "profile_overrides": PROFILES[args.profile], "seeds": args.seed_list,
        "sides": {"base": base or "", **{variant_side(v)[0]: v for v in args.variant}},
        "missing": missing, "seconds": None if seconds is None else round(seconds, 1),
        "reported": reported["metrics"],
        "runs": {n: {"seed": seed, "source": "report" if n in (earlier or {}) else "experiment",
                     "metrics": {k: found[n][k] for k in names if k in found[n]}}
                 for n, seed, _ in runs if n in found}}
    out = ROOT / "reports" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = ("## Decided on: val\n\n" + markdown(result)
             + "\n## Reported: the final model on test (not for decisions)\n\n"
             + markdown({"metrics": result["reported"]}))
    header = (f"# {args.name}\n\nProfile `{args.profile}`, seeds {args.seed_list}; sides: "
              + "; ".join(f"`{k}` = `{v or 'the params as committed'}`"
                          for k, v in result["sides"].items())
              + (f"; {seconds / 60:.1f} min" if seconds else "") + "\n\n")
    (out / f"{args.name}.md").write_text(header + table
                                         + (f"\nMissing runs: {', '.join(missing)}\n" if missing
                                            else ""))
    plot(result, out / f"{args.name}.png")
    print(header + table, flush=True)
    return out / f"{args.name}.json"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[],
                   help="overrides of one variant, 'key=value key=value' (repeatable)")
    p.add_argument("--baseline", default="", help="overrides of the baseline (default: none)")
    p.add_argument("--base-from", default=None, metavar="NAME",
                   help="take the baseline's runs from comparison NAME, which ran them with "
                        "the same profile and seeds: only the variants run")
    p.add_argument("--base-side", default="base", metavar="SIDE",
                   help="with --base-from: the side of NAME whose runs are the baseline, e.g. "
                        "the variant an earlier comparison adopted (default: its baseline)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per side: 1..N (default 5)")
    p.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="explicit seeds, e.g. 1,2,3 (instead of --seeds)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="params every run gets (default quick)")
    p.add_argument("--metric", action="append", default=None,
                   help=f"a metrics key to compare (repeatable; default: {', '.join(METRICS)})")
    p.add_argument("--report", action="append", default=None,
                   help="a test metric of the final model to report, e.g. arithmetic_exact_match"
                        f" (repeatable; default: {', '.join(REPORTED)})")
    p.add_argument("--name", default=None, help="the comparison's name (default cmp-<time>)")
    p.add_argument("--target", default="evaluate", help="the stage each run ends with")
    p.add_argument("--jobs", type=int, default=1, help="queue workers (default 1)")
    p.add_argument("--report-only", action="store_true",
                   help="compare the experiments of --name that ran before; run nothing")
    p.add_argument("--extend", action="store_true",
                   help="add to the report reports/compare/NAME.json: the runs it holds are "
                        "read from it (their experiments may be gone), only the others run")
    args = p.parse_args(argv)
    args.seed_list = args.seed_list or list(range(1, args.seeds + 1))
    args.metric = args.metric or METRICS
    args.report = args.report or REPORTED
    args.name = args.name or time.strftime("cmp-%Y%m%d-%H%M%S")
    if len(args.seed_list) < 2:
        p.error("a comparison needs at least 2 seeds per side")
    if args.base_side != "base" and not args.base_from:
        p.error("--base-side names a side of --base-from NAME; give --base-from too")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        p.error(f"--name {args.name!r}: letters, digits, '.', '_' and '-' only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    runs = plan(args)
    # runs whose figures a report holds: the baseline of --base-from, this report's own
    earlier = {**recorded_base(args), **(recorded(args) if args.extend else {})}
    seconds = None
    if not args.report_only:
        start = time.time()
        # a baseline read from another comparison ran before: only the variants run, and
        # only once every baseline run is there (not an hour of training to find one missing)
        todo = [r for r in runs if not (args.base_from and is_base(args, r[0]))
                and r[0] not in earlier]
        if args.base_from:
            wanted = {n for n, _, _ in runs if is_base(args, n)}
            absent = sorted(wanted - set(collect(wanted)) - set(earlier))
            if absent:
                raise SystemExit(f"compare: --base-from {args.base_from}: no finished run "
                                 f"{', '.join(absent)} (`dvc exp show` lists what exists, "
                                 f"reports/compare/{args.base_from}.json what ran before; "
                                 "the seeds and profile must be the ones it ran with)")
        clash = taken({n for n, _, _ in todo})
        if clash:
            raise SystemExit(
                f"compare: experiments named {', '.join(clash)} exist already (an earlier run "
                "of this comparison): --report-only reads them, --extend adds seeds to them; "
                "or give another --name, or remove them (`dvc exp remove NAME`, `dvc queue "
                "remove --all`)")
        queue(todo, args.target)
        # the workers stop by themselves once the queue is idle (`dvc queue stop` would leave
        # a shutdown in the broker that stops the next comparison's worker after one task)
        state = wait({n for n, _, _ in todo}, args.jobs)
        seconds = time.time() - start
        failed = sorted(n for n, s in state.items() if s == "Failed")
        if failed:
            print(f"compare: failed: {', '.join(failed)} (`dvc queue logs NAME`)", file=sys.stderr)
    report(args, runs, seconds, earlier)


if __name__ == "__main__":
    main()
