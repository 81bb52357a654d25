"""Write docs/results.md and the README's results table from the pipeline's metrics files.

    .venv/bin/python docs/results.py           # refresh docs/results.md and README.md's region
    .venv/bin/python docs/results.py --check   # exit 1 if either is stale (names which)

Every number in the tables comes from a file: ``metrics/*.json`` (written by the DVC stages),
``reports/*.json`` (written by the benchmark scripts) and ``params.yaml``; nothing is typed
by hand. The README's region between ``<!-- results:start -->`` and ``<!-- results:end -->``
gets the four-model comparison of ``metrics/evaluate.json``. A missing file gives one line
saying so and what writes it, not a crash. The output depends only on the files read (no
dates, no paths of this machine), so running the script twice changes nothing.

Standard library and PyYAML only (and ``stages.chain``, which needs no more): it runs before
the project is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docs import figures  # noqa: E402  (figures quoted in the prose of every page)
from stages import chain  # noqa: E402  (the chain's order, as dvc.yaml declares it)

RESULTS = "docs/results.md"
README = "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# how the tables name each model of the chain (a model without a label shows its stage name)
LABELS = {"pretrain": "pretrained", "sft": "SFT", "dpo": "DPO", "rl": "RL (GRPO)"}
MODELS = tuple((m, LABELS.get(m, m)) for m in chain.models(ROOT))
STAGES = tuple(chain.stage_order(ROOT))
TASK_LABELS = {"count": '"count the letter"', "arithmetic": "arithmetic", "spell": "spell",
               "reverse": "reverse"}

Json = dict[str, Any]


# --- reading -------------------------------------------------------------------------------

class Files:
    """The JSON files under the root, read once; what was missing, by path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Json | None] = {}

    def get(self, rel: str) -> Json | None:
        if rel not in self._cache:
            try:
                data = json.loads((self.root / rel).read_text())
                self._cache[rel] = data if isinstance(data, dict) else None
            except (OSError, ValueError):
                self._cache[rel] = None
        return self._cache[rel]

    def params(self) -> Json:
        try:
            data = yaml.safe_load((self.root / "params.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}


def missing(rel: str, how: str) -> list[str]:
    return [f"_`{rel}` is missing or unreadable: {how} writes it._", ""]


def dig(data: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


# --- formatting ----------------------------------------------------------------------------

def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:,.{digits}f}"


def whole(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{round(value):,}"


def pct(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.{digits}f}%"


def ratio(value: Any, digits: int = 2) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}x"


def with_ci(value: Any, low: Any, high: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{value:.3f} [{low:.2f}, {high:.2f}]"
    return f"{value:.3f}"


def minutes(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds:,.0f} s" if seconds < 90 else f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def key_table(data: Json, prefix: str,
              rows: Sequence[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """``| metric | value | key |`` for the keys of ``rows`` that ``data`` has."""
    body = [(label, fmt(data[prefix + key]), f"`{prefix}{key}`")
            for key, label, fmt in rows if prefix + key in data]
    return table(("metric", "value", "key"), body)


# --- the default run -----------------------------------------------------------------------

def models_in(ev: Json) -> list[tuple[str, str]]:
    return [(m, label) for m, label in MODELS if f"evaluate/{m}/docs_bpb" in ev]


def tasks_in(ev: Json, models: Sequence[tuple[str, str]]) -> list[str]:
    found = {k.split("/")[2][: -len("_exact_match")] for k in ev
             if k.startswith("evaluate/") and k.endswith("_exact_match") and k.count("/") == 2
             and not k.endswith(("_multi_exact_match", "_single_exact_match"))}
    order = [t for t in TASK_LABELS if t in found] + sorted(found - set(TASK_LABELS))
    return [t for t in order if any(f"evaluate/{m}/{t}_exact_match" in ev for m, _ in models)]


def comparison(files: Files) -> list[str]:
    """The four models side by side: the README's table and the first one of results.md."""
    ev = files.get("metrics/evaluate.json")
    if ev is None:
        return missing("metrics/evaluate.json", "`dvc repro evaluate`")
    models = models_in(ev)
    if not models:
        return ["_`metrics/evaluate.json` holds no model's results._", ""]
    choices = dig(files.params(), "evaluate", "choices")
    unigram = dig(files.get("metrics/pretrain.json"), "pretrain/unigram_bpb")

    def cells(metric: str, fmt: Callable[[str], str]) -> list[str]:
        return [fmt(f"evaluate/{m}/{metric}") for m, _ in models]

    def acc(metric: str) -> Callable[[str], str]:
        return lambda k: with_ci(ev.get(k), ev.get(k + "_ci95_low"), ev.get(k + "_ci95_high"))

    base = f" (unigram baseline {unigram:.2f})" if isinstance(unigram, (int, float)) else ""
    mc = (f"{choices}-way multiple choice (chance {1 / choices:.2f})"
          if isinstance(choices, int) and choices > 0 else "multiple choice")
    rows = [[f"bits per byte, test docs{base}", *cells("docs_bpb", lambda k: num(ev.get(k)))],
            ["bits per byte, test SFT replies", *cells("sft_bpb", lambda k: num(ev.get(k)))],
            [f"doc questions, {mc}", *cells("doc_mc_accuracy", acc("doc_mc_accuracy"))]]
    tasks = tasks_in(ev, models)
    for task in tasks:
        metric = f"{task}_exact_match"
        rows.append([f"{TASK_LABELS.get(task, task)} exact match", *cells(metric, acc(metric))])
        for kind, what in (("multi", "words of several tokens"), ("single", "one-token words")):
            metric = f"{task}_{kind}_exact_match"
            if any(f"evaluate/{m}/{metric}" in ev for m, _ in models):
                n = ev.get(f"evaluate/{models[-1][0]}/{task}_{kind}_n")
                rows.append([f"&nbsp;&nbsp;on {what} (n = {whole(n)})",
                             *cells(metric, acc(metric))])
    rows.append(["replies that end with `<|im_end|>`",
                 *cells("im_end_rate", lambda k: num(ev.get(k)))])
    out = table(["", *(label for _, label in models)], rows)

    def sizes(name: str) -> set[Any]:
        return {ev.get(f"evaluate/{m}/{name}_n") for m, _ in models} - {None}

    doc_n, task_n = sizes("doc_mc"), set().union(*(sizes(t) for t in tasks)) if tasks else set()
    counts = []
    if len(doc_n) == 1:
        counts.append(f"n = {whole(doc_n.pop())} doc questions")
    if len(task_n) == 1:
        counts.append(f"{whole(task_n.pop())} per task")
    note = "Accuracies with 95% Wilson intervals"
    note += f" ({', '.join(counts)})." if counts else "."
    machine = dig(files.get("metrics/pretrain.json"), "pretrain/device")
    if machine:
        note += f" Trained and evaluated on: {machine}."
    return out + [note, ""]


def extrapolation(files: Files) -> list[str]:
    ev = files.get("metrics/evaluate.json")
    if ev is None:
        return missing("metrics/evaluate.json", "`dvc repro evaluate`")
    factors = sorted({int(k.rsplit("bpb_ctx", 1)[1][:-1]) for k in ev
                      if "/bpb_ctx" in k and k.endswith("x") and k.rsplit("bpb_ctx", 1)[1][:-1]
                      .isdigit()})
    seq_len = dig(files.params(), "pack", "seq_len")
    head = [f"{f}x ({f * seq_len})" if isinstance(seq_len, int) else f"{f}x" for f in factors]
    rows = [[label, *(num(ev.get(f"evaluate/{m}/bpb_ctx{f}x")) for f in factors)]
            for m, label in models_in(ev)]
    out = [f"Bits per byte on the test docs re-cut into windows of 1x, 2x and 4x the training "
           f"context ({seq_len} tokens)." if isinstance(seq_len, int) else ""]
    return out + [""] + table(["model", *head], rows)


def contamination(files: Files) -> list[str]:
    """The split contract's verdict; per evaluation set, test examples that share a 13-word
    run with each training stream; then every model's accuracies on every example and
    without those."""
    ev = files.get("metrics/evaluate.json")
    if ev is None:
        return missing("metrics/evaluate.json", "`dvc repro evaluate`")
    pre = "evaluate/contamination/"
    sets = sorted({k[len(pre):].split("/")[0] for k in ev if k.startswith(pre)})
    if not sets:
        return ["_`metrics/evaluate.json` holds no contract check: it was written before "
                "the check ran on every evaluation (`dvc repro evaluate`)._", ""]
    streams = sorted({k.rsplit("/", 1)[1] for k in ev if k.startswith(pre)}
                     - {"examples", "contaminated"})
    rows = [[s, whole(ev.get(f"{pre}{s}/examples")), whole(ev.get(f"{pre}{s}/contaminated")),
             *(whole(ev.get(f"{pre}{s}/{st}")) for st in streams)] for s in sets]
    out = [f"Contract violations: {whole(ev.get('evaluate/contract/violations'))} (a "
           "violation stops the evaluate stage). Test words whose every token is spelled in "
           "some training word: "
           f"{pct(ev.get('evaluate/contract/test_words_token_covered'))}.", ""]
    out += table(["set", "test examples", "share a run", *(f"via {st}" for st in streams)],
                 rows)
    models = models_in(ev)
    if not models:
        return out
    metrics = sorted({k.split("/", 2)[2][: -len("_clean")] for k in ev
                      if k.endswith("_clean") and k.startswith(f"evaluate/{models[0][0]}/")})

    def cell(m: str, metric: str) -> str:
        n = ev.get(f"evaluate/{m}/{metric}_clean_n")
        left = "" if n is None else f" (n={n})"
        return f"{num(ev.get(f'evaluate/{m}/{metric}'))} / {num(ev.get(f'evaluate/{m}/{metric}_clean'))}{left}"

    out += ["Every example / without the ones that share a run (examples left):", ""]
    out += table(["metric", *(label for _, label in models)],
                 [[metric, *(cell(m, metric) for m, _ in models)] for metric in metrics])
    return out


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
    out = [f"Profile `{data.get('profile')}`, seeds {data.get('seeds')}, {len(sides)} sides"
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


def stage_sections(files: Files) -> list[str]:
    out: list[str] = []
    fetch = files.get("metrics/fetch.json")
    out += ["### fetch", ""]
    out += missing("metrics/fetch.json", "`dvc repro fetch`") if fetch is None else key_table(
        fetch, "fetch/", [
            ("documents", "documents", whole),
            ("documents_train", "documents, train", whole),
            ("documents_val", "documents, val", whole),
            ("bytes", "bytes of text", whole),
            ("conversations", "SFT conversations", whole),
            ("conversations_train", "SFT conversations, train", whole),
            ("conversations_val", "SFT conversations, val", whole),
            ("preference_pairs", "preference pairs", whole),
            ("duplicates_dropped", "exact duplicates dropped", whole),
            ("synthetic_repeats_kept", "synthetic training repeats kept", whole),
            ("empty_dropped", "empty records dropped", whole),
            ("bad_records", "malformed records", whole),
        ])
    tok = files.get("metrics/tokenizer.json")
    out += ["### tokenizer", ""]
    out += missing("metrics/tokenizer.json", "`dvc repro tokenizer`") if tok is None else key_table(
        tok, "tokenizer/", [
            ("vocab_size", "vocabulary", whole),
            ("bytes_per_token_val", "bytes per token, val", lambda v: num(v, 2)),
            ("train_texts", "texts trained on", whole),
        ])
    pack = files.get("metrics/pack.json")
    out += ["### pack", ""]
    out += missing("metrics/pack.json", "`dvc repro pack`") if pack is None else key_table(
        pack, "pack/", [
            ("tokens", "tokens in all shards", whole),
            ("pretrain_train_rows", "pretraining rows, train", whole),
            ("pretrain_val_rows", "pretraining rows, val", whole),
            ("pretrain_chat_share", "share of pretraining tokens from SFT conversations", num),
            ("pretrain_chat_conversations", "SFT conversations in the pretraining stream",
             whole),
            ("sft_train_rows", "SFT rows, train", whole),
            ("sft_train_padded_fraction", "SFT rows' padded fraction, train", pct),
            ("sft_train_truncated", "SFT conversations truncated, train", whole),
            ("tokens_per_second", "packing tokens/s", whole),
        ])
    for stage in ("pretrain", "sft"):
        data = files.get(f"metrics/{stage}.json")
        out += [f"### {stage}", ""]
        out += missing(f"metrics/{stage}.json", f"`dvc repro {stage}`") if data is None else \
            key_table(data, f"{stage}/", [
                ("params", "parameters", whole),
                ("trainable_share", "trainable share", pct),
                ("steps", "steps", whole),
                ("export_step", "exported step (best val loss)", whole),
                ("val_loss", "val loss (nats/token)", num),
                ("val_bpb", "val bits per byte", num),
                ("unigram_bpb", "unigram baseline, bits per byte", num),
                ("tokens_per_second", "tokens/s", whole),
                ("mfu", "MFU", pct),
                ("peak_memory_mb", "peak memory, MB", whole),
                ("autocast_dtype", "autocast dtype", str),
                ("muon_dtype", "Muon iteration dtype", str),
            ])
        if data and data.get(f"{stage}/device"):
            out += [f"Machine: {data[f'{stage}/device']}.", ""]
    dpo = files.get("metrics/dpo.json")
    out += ["### dpo", ""]
    out += missing("metrics/dpo.json", "`dvc repro dpo`") if dpo is None else key_table(
        dpo, "dpo/", [
            ("train_pairs", "training pairs", whole),
            ("on_policy_rejected", "of which the SFT model's own wrong answer is rejected",
             whole),
            ("val_pairs", "val pairs", whole),
            ("val_reward_accuracy", "val reward accuracy", num),
            ("val_reward_margin", "val reward margin", num),
            ("val_loss", "val DPO loss", num),
            ("kl_to_reference", "KL to the reference (on the policy's samples)", num),
            ("trainable_share", "trainable share", pct),
        ])
    out += rl_section(files)
    quant = files.get("metrics/quantize.json")
    out += ["### quantize", ""]
    out += missing("metrics/quantize.json", "`dvc repro quantize`") if quant is None else \
        key_table(quant, "quantize/", [
            ("fp_mb", "float model, MB", lambda v: num(v, 1)),
            ("quantized_mb", "quantized model, MB", lambda v: num(v, 1)),
            ("size_ratio", "size ratio", ratio),
            ("gguf_mb", "model.gguf, MB", lambda v: num(v, 1)),
            ("report_split", "split the figures below are on", str),
            ("bpb_fp", "bits per byte, float", num),
            ("bpb_quantized", "bits per byte, quantized", num),
            ("bpb_delta", "bits-per-byte change", lambda v: f"{v:+.5f}"),
            ("greedy_exact_agreement", "prompts with an identical greedy reply", num),
            ("greedy_token_agreement", "identical greedy tokens", num),
            ("decode_speed_ratio", "decode speed, quantized / float", ratio),
            ("max_layer_error", "largest layer output error", lambda v: num(v, 4)),
        ])
    return out


def rl_section(files: Files) -> list[str]:
    rl = files.get("metrics/rl.json")
    out = ["### rl", ""]
    if rl is None:
        return out + missing("metrics/rl.json", "`dvc repro rl`")
    out += key_table(rl, "rl/", [
        ("steps", "steps", whole),
        ("reward_first10", "mean reward of the samples, first 10 steps", num),
        ("reward_last10", "mean reward of the samples, last 10 steps", num),
        ("kl_last", "KL to the starting model, last step", lambda v: num(v, 4)),
    ])
    tasks = [t for t in TASK_LABELS if f"rl/{t}_exact_before" in rl]
    if tasks:
        n = dig(files.params(), "rl", "eval_per_task")
        out += ["Greedy exact match on val task questions before and after the stage"
                + (f" ({n} per task):" if isinstance(n, int) else ":"), ""]
        out += table(("task", "before", "after"),
                     [(t, num(rl.get(f"rl/{t}_exact_before")), num(rl.get(f"rl/{t}_exact_after")))
                      for t in tasks])
    return out


def stage_times(files: Files) -> list[str]:
    rows, total = [], 0.0
    for stage in STAGES:
        data = files.get(f"metrics/{stage}.json")
        if data is None:
            rows.append((stage, "(no metrics file)", "-"))
            continue
        seconds = data.get(f"{stage}/stage_seconds")
        train = data.get(f"{stage}/train_seconds")
        total += seconds if isinstance(seconds, (int, float)) else 0.0
        resumed = data.get(f"{stage}/resumed_from")
        # a stage that resumed its own checkpoint trained in an earlier process: its
        # training seconds are that run's, its stage seconds only this one's
        note = (f" (resumed at step {resumed}: it trained in an earlier process)"
                if isinstance(resumed, int) and resumed >= 0 else "")
        rows.append((stage, minutes(seconds) + note, minutes(train)))
    rows.append(("**all stages**", f"**{minutes(total)}**", ""))
    return table(("stage", "stage seconds", "of which training"), rows)


# --- benchmarks ----------------------------------------------------------------------------

def throughput(files: Files) -> list[str]:
    runs = [(rel, files.get(rel)) for rel in ("reports/train_throughput.json",
                                              "reports/train_throughput_avx2cap.json")]
    if all(data is None for _, data in runs):
        return missing("reports/train_throughput.json", "`benchmarks/train_throughput.py`")
    rows, machines = [], []
    for rel, data in runs:
        if data is None:
            continue
        machines.append(f"`{rel}`: {data.get('machine', 'machine not recorded')}, "
                        f"kernels {data.get('kernels', '-')}, torch {data.get('torch', '-')}")
        results = data.get("results") or []
        base = {(r.get("preset"), r.get("dtype")): r.get("seconds_per_step")
                for r in results if r.get("optimizer") == "adamw"}
        for r in results:
            step, ref = r.get("seconds_per_step"), base.get((r.get("preset"), r.get("dtype")))
            rel_step = ratio(step / ref) if isinstance(step, (int, float)) and ref else "-"
            rows.append((data.get("kernels", "-"), r.get("preset", "-"), r.get("dtype", "-"),
                         r.get("optimizer", "-"), r.get("muon_dtype") or "-",
                         f"{r.get('batch_size', '-')} x {r.get('seq_len', '-')}",
                         whole(r.get("tokens_per_s")), num(step), rel_step, pct(r.get("mfu"))))
    out = table(("kernels", "preset", "dtype", "optimizer", "Muon iteration", "batch",
                 "tokens/s", "s/step", "step vs AdamW", "MFU"), rows)
    return out + [f"- {m}" for m in machines] + [""]


def decode(files: Files) -> list[str]:
    data = files.get("reports/decode_speed.json")
    if data is None:
        return missing("reports/decode_speed.json", "`benchmarks/decode_speed.py`")
    batches = data.get("batches") or {}
    if not batches:
        return ["_`reports/decode_speed.json` holds no decode rates (`batches`)._", ""]
    before = (files.get("reports/history/2026-12-02-decode_speed-before.json") or {}).get("batches") or {}
    labels = {"generate": "`llmcore.infer.generate`", "engine": "the serving engine",
              "engine_compiled": "the engine, `--compile`",
              "transformers": "transformers `generate`"}
    names = list(dict.fromkeys(k for b in batches.values() for k in b.get("tok_s", {})))
    header = ["decoder"]
    for b in batches:
        header += [f"batch {b}: tokens/s"] + ([f"batch {b}: before"] if b in before else [])
    header.append("agreement with `generate` (batch 1)")
    rows = []
    for name in names:
        row = [labels.get(name, name)]
        for b, d in batches.items():
            row.append(num(dig(d, "tok_s", name), 1))
            if b in before:
                row.append(num(dig(before, b, "tok_s", name), 1))
        agree = dig(batches, "1", "agreement_with_generate", name)
        row.append("-" if name == "generate" else num(agree))
        rows.append(row)
    out = table(header, rows)
    facts = [f"{data.get('tokens', '-')} greedy new tokens per sequence, median of "
             f"{data.get('rounds', '-')} interleaved rounds, {data.get('threads', '-')} threads",
             f"machine: {data.get('machine', 'not recorded in the file')}"]
    if dig(data, "profile", "per_token_ms") is not None:
        facts.append(f"the engine at batch 1 profiled: {num(dig(data, 'profile', 'per_token_ms'))}"
                     f" ms and {num(dig(data, 'profile', 'ops_per_token'), 1)} torch ops per "
                     "token")
    facts += [f"{k} not run: {v}" for k, v in (data.get("skipped") or {}).items()]
    if before:
        facts.append("\"before\": `reports/history/2026-12-02-decode_speed-before.json`, the same benchmark on the "
                     "code before the decode work")
    return out + ["; ".join(facts) + ".", ""]


def serve_load(files: Files) -> list[str]:
    runs = [(label, rel, files.get(rel)) for label, rel in (
        ("one at a time", "reports/serve_load-before.json"),
        ("batched", "reports/serve_load.json"),
        ("batched, `--compile`", "reports/serve_load-compiled.json"))]
    present = [(label, rel, data) for label, rel, data in runs if data is not None]
    if not present:
        return missing("reports/serve_load.json", "`benchmarks/serve_load.py`")
    out = []
    for _, rel, data in runs:
        if data is None:
            out += missing(rel, "`benchmarks/serve_load.py`")
    head = ["clients"]
    for label, _, _ in present:
        head += [f"{label}: tok/s", f"{label}: TTFT p50 / p95 ms", f"{label}: token p50 / p95 ms"]
    levels = sorted({lvl.get("clients") for _, _, d in present for lvl in d.get("levels", [])
                     if isinstance(lvl.get("clients"), int)})
    rows = []
    for clients in levels:
        row = [str(clients)]
        for _, _, data in present:
            lvl = next((x for x in data.get("levels", []) if x.get("clients") == clients), {})
            row += [whole(lvl.get("tokens_per_s")),
                    f"{whole(lvl.get('ttft_p50_ms'))} / {whole(lvl.get('ttft_p95_ms'))}",
                    f"{num(lvl.get('token_p50_ms'), 1)} / {num(lvl.get('token_p95_ms'), 1)}"]
        rows.append(row)
    out += table(head, rows)
    errors = sum(lvl.get("errors", 0) or 0 for _, _, d in present for lvl in d.get("levels", []))
    for label, rel, data in present:
        scale = data.get("scaling_vs_1_client") or {}
        scaling = ", ".join(f"{k} clients {ratio(v)}" for k, v in scale.items() if k != "1")
        out.append(f"- {label} (`{rel}`): server args `{data.get('server_args') or '(none)'}`, "
                   f"model `{data.get('model', '-')}`, at most {data.get('max_tokens', '-')} "
                   f"tokens per reply; throughput against one client: {scaling or '-'}; "
                   f"machine: {data.get('machine', 'not recorded')}.")
    return out + [f"- Errors, all runs and levels: {errors}.", ""]


def first_time_below(evals: Sequence[Json], target: float) -> Any:
    return next((e.get("seconds") for e in evals
                 if isinstance(e.get("val_bpb"), (int, float)) and e["val_bpb"] <= target), None)


def speedrun(files: Files, rel: str) -> list[str]:
    data = files.get(rel)
    if data is None:
        return missing(rel, "`make speedrun` (`benchmarks/speedrun.py`)")
    sides = data.get("sides") or {}
    names = [n for n in sides if n != "peer"] + (["peer"] if "peer" in sides else [])
    evals = {n: sides[n].get("evals") or [] for n in names}
    steps = max((len(e) for e in evals.values()), default=0)
    head = ["checkpoint"] + [f"{n}: own s / val bpb" for n in names]
    rows = []
    for i in range(1, steps):
        row = [str(i)]
        for n in names:
            e = evals[n][i] if i < len(evals[n]) else {}
            row.append(f"{num(e.get('seconds'), 0)} / {num(e.get('val_bpb'))}")
        rows.append(row)
    out = table(head, rows)
    base_bpb = dig(evals.get("llmcore"), -1, "val_bpb")
    base_rate = dig(sides, "llmcore", "tokens_per_s")

    def against_base(n: str) -> tuple[str, str]:
        bpb, rate = dig(evals[n], -1, "val_bpb"), sides[n].get("tokens_per_s")
        if n == "llmcore" or not isinstance(base_bpb, (int, float)) \
                or not isinstance(bpb, (int, float)):
            return "", ""
        speed = ratio(rate / base_rate) if isinstance(rate, (int, float)) and base_rate else "-"
        return f"{bpb - base_bpb:+.3f}", speed

    out += table(("side", "steps", "tokens", "tokens/s", "final val bpb",
                  "bpb vs llmcore", "tokens/s vs llmcore"),
                 [(n, whole(sides[n].get("steps")), whole(sides[n].get("tokens")),
                   whole(sides[n].get("tokens_per_s")), num(dig(evals[n], -1, "val_bpb")),
                   *against_base(n)) for n in names])
    recipe = data.get("recipe") or {}
    facts = [f"{data.get('preset', '-')} ({whole(data.get('params'))} parameters), batch "
             f"{data.get('batch_size', '-')} x {data.get('seq_len', '-')}, "
             f"{num(data.get('budget_seconds'), 0)} s per side in {num(data.get('slice_seconds'), 0)}"
             f"-s slices, scored on {data.get('eval_rows', '-')} held-out rows",
             "recipe " + ", ".join(f"{k} {v}" for k, v in recipe.items()),
             f"tokens/s llmcore / peer {ratio(data.get('tokens_per_s_ratio'), 3)}"]
    variants = data.get("variants") or {}
    if variants:
        facts.append("variants " + "; ".join(
            f"{name}: " + ", ".join(f"{section}.{k}={v}" for section, kv in spec.items()
                                    for k, v in (kv or {}).items())
            for name, spec in variants.items()))
    if "llmcore_lower_bpb_at_every_checkpoint" in data:
        facts.append("llmcore lower at every checkpoint: "
                     f"{'yes' if data['llmcore_lower_bpb_at_every_checkpoint'] else 'no'}")
    peer_final = dig(evals.get("peer"), -1, "val_bpb")
    if isinstance(peer_final, (int, float)) and "llmcore" in evals:
        reached = first_time_below(evals["llmcore"], peer_final)
        facts.append(f"first llmcore checkpoint at or below the peer's final {peer_final:.3f}: "
                     + (f"{reached:.0f} s" if reached is not None else "none"))
    facts.append(f"machine: {data.get('machine', 'not recorded')}, torch {data.get('torch', '-')}")
    return out + ["; ".join(facts) + ".", ""]


def scaling(files: Files) -> list[str]:
    """The isoFLOP optima per vocabulary and budget, the power laws, the sweeps."""
    rel = "reports/scaling/scaling.json"
    data = files.get(rel)
    if data is None:
        return missing(rel, "`make scaling` (`benchmarks/scaling.py`)")
    rows = []
    for vocab, f in (data.get("fits") or {}).items():
        for budget, b in (f.get("budgets") or {}).items():
            rows.append((vocab, budget, str(b.get("runs")),
                         f"{b['optimal_params'] / 1e6:.2f}M" + ("" if b.get("inside_grid")
                                                               else " (grid edge)"),
                         f"{b['optimal_tokens'] / 1e6:.2f}M", num(b.get("optimal_bpb")),
                         f"{b.get('best_run')} ({num(b.get('best_run_bpb'))})"))
    out = table(("vocab", "budget (FLOPs)", "runs fitted", "optimal non-embedding params",
                 "optimal tokens", "fitted bpb", "best run (bpb)"), rows)
    laws = []
    for vocab, f in (data.get("fits") or {}).items():
        p, t = f.get("params_law"), f.get("tokens_law")
        if p and t:
            laws.append(f"vocab {vocab}: N_opt ~ C^{p['exponent']:.2f}, D_opt ~ C^{t['exponent']:.2f}")
    runs = data.get("runs") or []
    grid = [r for r in runs if not r.get("tag")]
    up = [r for r in grid if r.get("val_turned_up")]
    facts = laws + [f"{len(grid)} grid runs, {len(up)} whose val bpb turned up by their last "
                    "evaluation (repeating the data costs)" + (": " + ", ".join(
                        f"{r['key']} ({r['epochs']:.1f} epochs)" for r in up) if up else ""),
                    f"machine: {data.get('machine', 'not recorded')}"]
    out += ["; ".join(facts) + ".", ""]
    if grid:
        out += ["Every grid run (docs val bpb at the end; `*`: worse than its best evaluation):",
                ""]
        ordered = sorted(grid, key=lambda r: (r["vocab"], r["budget"],
                                              r["non_embedding_params"]))
        out += table(("vocab", "budget", "shape", "non-emb params", "tokens", "epochs",
                      "val bpb", "s", "GFLOP/s"),
                     [(str(r["vocab"]), f"{r['budget']:.2g}", r["shape"],
                       f"{r['non_embedding_params'] / 1e6:.2f}M", f"{r['tokens'] / 1e6:.2f}M",
                       f"{r['epochs']:.2f}",
                       num(r["final_val_bpb"], 4) + ("*" if r.get("val_turned_up") else ""),
                       whole(r.get("seconds")), num(r.get("achieved_gflops"), 1))
                      for r in ordered])
    sweeps = [r for r in runs if r.get("tag")]
    if sweeps:
        out += ["Sweeps of the recipe (one shape and budget, one change each):", ""]
        out += table(("tag", "run", "batch", "lr", "val bpb"),
                     [(r["tag"], r["key"].split(":", 1)[-1], str(r.get("batch_size", "-")),
                       str(r.get("lr", "-")), num(r.get("final_val_bpb"), 4)) for r in sweeps])
    return out


def harness(files: Files) -> list[str]:
    data = files.get("reports/harness.json")
    if data is None:
        return missing("reports/harness.json", "`make harness`")
    rows = [[r["task"], num(r["harness"]), num(r["llmcore"]),
             f"{r['harness'] - r['llmcore']:+.3f}"] for r in data.get("tasks", [])]
    out = [f"The `{data.get('model')}` model; lm_eval ran {minutes(data.get('lm_eval_seconds'))}.",
           ""]
    out += table(["task", "lm-eval", "llmcore", "difference"], rows)
    stage = [r for r in data.get("tasks", []) if "stage_mean_per_token" in r]
    for r in stage:
        out += [f"The doc questions by the evaluate stage's own rule (mean log-probability per "
                f"token): {num(r['stage_mean_per_token'])}; the harness's `acc_norm` (per "
                f"character): {num(r.get('harness_acc_norm'))}.", ""]
    return out


def gguf(files: Files) -> list[str]:
    data = files.get("reports/gguf_roundtrip.json")
    if data is None:
        return missing("reports/gguf_roundtrip.json", "`benchmarks/gguf_roundtrip.py`")
    kinds = [k for k, v in data.items() if isinstance(v, dict)]
    rows = [(f"`{k}`", num(data[k].get("file_mb"), 1), data[k].get("tokenization_equal", "-"),
             num(data[k].get("greedy_identical")), num(data[k].get("token_agreement")),
             whole(data[k].get("llama_cpp_tokens_per_s"))) for k in kinds]
    out = table(("type", "file MB", "tokenization equal", "identical greedy continuations",
                 "identical tokens", "llama.cpp tokens/s"), rows)
    return out + [f"Model `{data.get('model', '-')}`, {data.get('prompts', '-')} held-out prompts, "
                  f"{data.get('tokens', '-')} greedy tokens each.", ""]


def hf_compat(files: Files) -> list[str]:
    rels = sorted(p.relative_to(files.root).as_posix()
                  for p in (files.root / "reports").glob("hf_compat*.json"))
    runs = [(rel, files.get(rel)) for rel in rels]
    runs = [(rel, d) for rel, d in runs if d is not None]
    if not runs:
        return missing("reports/hf_compat-*.json", "`benchmarks/hf_compat.py`")
    rows = [(d.get("transformers", "-"), num(d.get("rope_theta_read"), 0),
             num(d.get("rope_theta_expected"), 0), str(d.get("max_abs_logit_diff", "-")),
             num(d.get("top1_agreement")), f"`{rel}`") for rel, d in runs]
    return table(("transformers", "rope theta read", "expected", "max abs logit diff",
                  "top-1 agreement", "file"), rows)


# --- the documents -------------------------------------------------------------------------

def stale_map(files: Files) -> list[str]:
    """Which stages an edit of each params module re-runs, before and after one module per
    section, and how far an edit of any code file reaches on average."""
    rel = "reports/stale_map.json"
    data = files.get(rel)
    if data is None or "against" not in data:
        return missing(rel, "`python benchmarks/stale_map.py --rev NEW --against OLD`")
    now, then = data["files"], data["against"]["files"]
    rows = [[f"`{f}`", " ".join(then[f]) or "-", "(absent)"] for f in sorted(then)
            if f.startswith("llmcore/config") and f not in now]
    rows += [[f"`{f}`", "(absent)", " ".join(now[f]) or "-"] for f in sorted(now)
             if f.startswith("llmcore/config") and f not in then]
    before, after = data["against"]["summary"], data["summary"]
    rows.append(["every code file: stages per edit, mean (max)",
                 f"{before['mean_stages_per_file']} ({before['max_stages_per_file']})",
                 f"{after['mean_stages_per_file']} ({after['max_stages_per_file']})"])
    return [f"`{rel}` (`python benchmarks/stale_map.py --rev {data['rev']} --against "
            f"{data['against']['rev']}`): the stages whose DVC deps list a file, so the "
            "stages an edit of it re-runs, read from dvc.yaml at each commit.", ""] + table(
        ["file", f"stages made stale at {data['against']['rev']}",
         f"at {data['rev']}"], rows)


def results_md(files: Files) -> str:
    out = ["# Results", "",
           "<!-- Generated by docs/results.py from metrics/*.json, reports/*.json and "
           "params.yaml: do not edit by hand. -->", "",
           "Every table here is written by `.venv/bin/python docs/results.py` from the files it "
           "names; `--check` fails when this page or the README's table is older than the "
           "files. The prose around the figures, and measurements that no file keeps, are on "
           "the topic pages: [evaluation](evaluation.md), [alignment](alignment.md), "
           "[benchmarks](benchmarks.md).", "",
           "## The default run", "",
           "`make pipeline` with the committed `params.yaml`: the metrics the stages wrote "
           "(`metrics/*.json`, DVC metrics).", "",
           "### Four models compared", "", "From `metrics/evaluate.json`:", ""]
    out += comparison(files)
    out += ["### The default over seeds", ""]
    out += default_seeded(files)
    out += chain_gain(files, SEEDED_DEFAULT.replace(".json", "-chain.json"))
    out += ["![loss curves](../reports/evaluate/loss_curves.png)", "",
            "### Length extrapolation", ""]
    out += extrapolation(files)
    out += ["### Contamination", "",
            "The split contract's check, and the test examples that share a run of 13 words "
            "with a training stream (`reports/evaluate/contamination.md` lists them with "
            "each set's contract; [evaluation](evaluation.md#the-contract-checked-every-run) "
            "says how it is checked):", ""]
    out += contamination(files)
    out += ["## Per stage", ""]
    out += stage_sections(files)
    out += ["## What an edit re-runs", ""]
    out += stale_map(files)
    out += ["## Stage times", "",
            "`<stage>/stage_seconds` of each metrics file (the stage's process, set-up excluded)"
            " and `<stage>/train_seconds` where the stage trains:", ""]
    out += stage_times(files)
    out += ["## Benchmarks", "",
            "Written by the scripts in `benchmarks/` (see [benchmarks](benchmarks.md) for what "
            "each measures and how to run it).", "",
            "### Training throughput per optimizer", "",
            "`reports/train_throughput.json` (the machine as it is) and "
            "`reports/train_throughput_avx2cap.json` (its kernels capped to AVX2):", ""]
    out += throughput(files)
    out += ["### Decode speed", "", "`reports/decode_speed.json`:", ""]
    out += decode(files)
    out += ["### Serving under load", "",
            "`reports/serve_load*.json`: streaming clients against a real `llmcore serve` on "
            "127.0.0.1, greedy. \"One at a time\" is the earlier server (one request at a time "
            "behind a lock), \"batched\" the continuous-batching engine of `llmcore serve`.",
            ""]
    out += serve_load(files)
    out += ["### Speedrun: quality per minute", "",
            "`reports/speedrun.json`: val bits per byte at each checkpoint of each side's own "
            "clock.", ""]
    out += speedrun(files, "reports/speedrun.json")
    out += ["![speedrun](../reports/speedrun.png)", "",
            "### Speedrun with variants", "",
            "`reports/speedrun-ablation/speedrun.json`: the switches measured as extra llmcore "
            "sides of one run.", ""]
    out += speedrun(files, "reports/speedrun-ablation/speedrun.json")
    out += ["### Scaling study", "",
            "`reports/scaling/scaling.json` ([scaling](scaling.md) says how it is run and read):"
            " per vocabulary and FLOP budget, the minimum of the isoFLOP parabola.", ""]
    out += scaling(files)
    if (files.root / "reports/scaling/isoflop.png").exists():
        out += ["![isoFLOP curves](../reports/scaling/isoflop.png)", ""]
    out += ["### Experiments over seeds", "",
            "`reports/compare/seeds-quick.json` ([experiments](experiments.md#seeds-and-"
            "significance) says how it is run and read): each variant against the committed "
            "params, every side trained with the same seeds. **Measured on the old splits**, "
            "before the three splits by construction: its task and doc-question figures are "
            "on sets that training could reach ([evaluation](evaluation.md#reading-the-"
            "default-run) says what they measured); they compare the recipes with each other, "
            "not what a model does on unseen questions.", ""]
    out += seeded_section(files, "seeds-quick", "seeded comparison")
    out += ["### Task weights over seeds", "",
            "Each variant against the params before it (`fetch.synthetic_task_weights` all 1; "
            "the baseline's runs are the previous default's, `default-3seeds-base-s*`, "
            "reused with `--base-from`), decided on val. The first is the default now. "
            "`reports/compare/arith2.json`: `python -m pipeline.compare --variant "
            "\"fetch.synthetic_task_weights.arithmetic=2\" --seed-list 1337,1,2 --profile "
            "full --name arith2 --base-from default-3seeds`:", ""]
    out += seeded_section(files, "arith2", "arithmetic x2 over seeds")
    out += ["`reports/compare/arith2-rev05.json`: arithmetic x2 and reverse x0.5, stopped "
            "after its first seed (`--name arith2-rev05`): reverse fell far below every seed "
            "of the baseline.", ""]
    out += seeded_section(files, "arith2-rev05", "arithmetic x2, reverse x0.5")
    out += ["### SFT packing over seeds", "",
            "First fit over eight open rows against next fit (one open row): the code of "
            "`llmcore/data/packing.py`, not a param, so the variant is the workspace with the "
            "new packing (`--variant first-fit:`) against the default of the comparison "
            "above (`--base-from arith2 --base-side arithmetic-2`). Same steps and rows per "
            "step; the rows hold 13% more conversations. The variant is the default now. "
            "`reports/compare/firstfit.json`: `python -m pipeline.compare --variant first-fit: "
            "--seed-list 1337,1,2 --profile full --name firstfit --base-from arith2 "
            "--base-side arithmetic-2`:", ""]
    out += seeded_section(files, "firstfit", "first-fit packing over seeds")
    out += ["`reports/compare/sft1200.json`: 1,200 SFT steps instead of 1,600 against the "
            "first-fit default (`--variant sft.max_steps=1200 --base-from firstfit "
            "--base-side first-fit --name sft1200`), the minutes the wall-time target asks "
            "for; stopped after its first seed, which fell below every val task figure of "
            "the baseline's same seed:", ""]
    out += seeded_section(files, "sft1200", "1,200 SFT steps")
    out += ["### Alignment against SFT given the same minutes", "",
            "`reports/compare/rl-vs-sft.json`: the committed chain (SFT, then DPO, then GRPO) "
            "against SFT alone given about the minutes DPO and GRPO take, in extra SFT steps "
            "(`python -m pipeline.compare --variant \"sft-same-minutes: sft.max_steps=1890 "
            "dpo.max_steps=0 rl.max_steps=0\" --seed-list 1337,1,2,3,4 --profile full --name "
            "rl-vs-sft --extend`: the runs of seeds 1337, 1 and 2 (and the SFT side's seed "
            "1337 and 1) ran in an earlier checkout and are read from the report, the others "
            "were added to it). Both sides' final models are scored; a seed's two sides share "
            "their pretraining, so the paired test is the one to read. The table after it is "
            "what each alignment step adds to the model before it within the chain, over the "
            "seeds whose experiments it could read (the baseline side's runs, "
            "`benchmarks/chain_gain.py --name rl-vs-sft --side base`).", ""]
    out += seeded_section(files, "rl-vs-sft", "the chain against SFT given the same minutes")
    out += chain_gain(files, "reports/compare/rl-vs-sft-chain.json")
    out += ["### The quick profile of the default", "",
            "`reports/compare/quick-firstfit.json`: the committed params alone in the quick "
            "profile (`python -m pipeline.compare --seed-list 1337,1 --profile quick --name "
            "quick-firstfit`): what a quick comparison can see of each task on val. A task "
            "near zero here cannot be compared in the quick profile; use the full one.", ""]
    out += seeded_section(files, "quick-firstfit", "the quick profile of the default")
    out += ["### The letters curriculum over seeds", "",
            "`reports/compare/letters-quick.json`: the committed params against the same "
            "without the letters curriculum (`pack.letters_share=0`), the quick profile, "
            "decided on val and reported on test:", ""]
    out += seeded_section(files, "letters-quick", "letters curriculum over seeds")
    out += ["### SFT recipes for the tasks, on val", "",
            "`reports/task_recipe/runs.jsonl` (`benchmarks/task_recipe.py`): one fine-tuning "
            "run per row from a pretrained model, scored by greedy exact match on the val "
            "split's task questions (200 per task), spell, count and reverse also on their "
            "words of several tokens. Rows of one split version ran on the same pools and "
            "starting model; rows of different versions are not comparable.", ""]
    out += recipe_runs(files.root / "reports/task_recipe/runs.jsonl")
    out += ["### lm-evaluation-harness on the export", "", "`reports/harness.json`:", ""]
    out += harness(files)
    out += ["### GGUF in llama.cpp", "", "`reports/gguf_roundtrip.json`:", ""]
    out += gguf(files)
    out += ["### transformers compatibility of `llmcore export`", "",
            "`reports/hf_compat-*.json`, one per transformers version:", ""]
    out += hf_compat(files)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def recipe_runs(path: Path) -> list[str]:
    """The recipe probes of benchmarks/task_recipe.py, one row per run, in the file's order."""
    try:
        runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return missing(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                       "`python benchmarks/task_recipe.py --tag NAME`")
    rows = []
    for r in runs:
        rec, val = r.get("recipe", {}), r.get("val", {})
        what = (f"{rec.get('optimizer')} lr {rec.get('lr')}, {rec.get('steps')} steps x "
                f"{rec.get('batch_size')}, {rec.get('per_task')}/task"
                + (f" (x {rec['task_weights']})" if rec.get("task_weights") else "")
                + ", letters "
                f"{rec.get('letters_share')}"
                + (f" ({rec['compound_share']:.0%} compounds)" if rec.get("compound_share") else "")
                + (", docs" if rec.get("docs") else "")
                + (f"; from {r['init_steps']} pretraining steps" if r.get("init_steps") else ""))
        rows.append([f"`{r.get('tag')}`", r.get("split_version", "3"), what,
                     whole(r.get("tokens")), num(r.get("train_seconds"), 0),
                     *(num(val.get(k)) for k in ("arithmetic", "count", "spell", "spell_multi",
                                                 "reverse", "reverse_multi"))])
    return table(["run", "split version", "recipe", "tokens", "seconds", "arithmetic", "count",
                  "spell", "spell, several tokens", "reverse", "reverse, several tokens"],
                 rows) + [""]


SPLIT_WORDS = {"train": "trained on", "val": "val split: held out, used for decisions",
               "test": "test split: never trained on", "none": "not a task word"}


SHOWN_LINES = 6  # a reply's lines shown in the README; the rest is counted, not printed


def shown(reply: str) -> str:
    """A reply for the README: its first SHOWN_LINES non-blank lines, and how many more."""
    if not reply.strip():
        return "(empty reply)"
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    more = len(lines) - SHOWN_LINES
    return "\n".join(lines[:SHOWN_LINES] + ([f"[... {more} more line{'s' * (more > 1)}]"] if more > 0 else []))


def samples(files: Files) -> list[str]:
    """The last model of the chain's greedy replies to ``evaluate.prompts``, verbatim, each
    with the split its subject falls in; then test questions drawn at random, with a tally."""
    data = files.get("reports/evaluate/samples.json")
    if not data or not data.get("replies"):
        return missing("reports/evaluate/samples.json", "dvc repro evaluate")
    name = data.get("final_model") or list(data["replies"])[-1]
    label = dict(MODELS).get(name, name)
    out = [f"What the {label} model, the last of the chain and the one `quantize` takes, answers "
           "(greedy, as generated: working lines, then the answer on the last line):", ""]
    subjects = data.get("subjects") or [None] * len(data["prompts"])
    for prompt, reply, subject in zip(data["prompts"], data["replies"][name], subjects,
                                      strict=False):
        where = ""
        if subject:
            what = subject["key"].replace("pair:", "operands ").replace("word:", "word ")
            where = f" &nbsp;_({what}: {SPLIT_WORDS.get(subject['split'], subject['split'])})_"
        out += [f"> {prompt}{where}", "", "```", shown(reply), "```", ""]
    drawn = data.get("drawn") or []
    if drawn:
        right = sum(d["correct"] for d in drawn)
        per_task = len(drawn) // max(1, len({d["task"] for d in drawn}))
        out += [f"Test questions drawn at random (seeded, {per_task} per task), the {label} "
                "model's final line against the answer: "
                f"**{right} of {len(drawn)} right**.", "",
                "| task | question | tokens in the word | reply's last line | answer | right |",
                "|---|---|---|---|---|---|"]
        for d in drawn:
            last = (d["reply"].strip().splitlines() or [""])[-1].replace("|", "\\|")
            question = d["question"].replace("|", "\\|")
            pieces = d["pieces"] if d.get("pieces") is not None else ""
            out.append(f"| {d['task']} | {question} | {pieces} | `{last}` | "
                       f"`{d['answer']}` | {'yes' if d['correct'] else 'no'} |")
        out.append("")
    return out


# the committed params over seeds: a comparison's file and the side whose runs had exactly
# these params (the baseline of a default run alone, or the variant a comparison adopted),
# and the command that made it
SEEDED_DEFAULT = "reports/compare/firstfit.json"
SEEDED_SIDE = "first-fit"
SEEDED_COMMAND = ("python -m pipeline.compare --variant first-fit: --seed-list 1337,1,2 "
                  "--profile full --name firstfit --base-from arith2 --base-side arithmetic-2")
# what the default is judged on (spell and reverse on their words of several tokens)
JUDGED = ("arithmetic_exact_match", "count_exact_match", "spell_multi_exact_match",
          "reverse_multi_exact_match")


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
    out = [f"`{SEEDED_DEFAULT}` (`{SEEDED_COMMAND}`; side `{SEEDED_SIDE}`, whose runs had "
           "the committed params): one run per seed, as DVC experiments. The seed changes "
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


def readme_region(files: Files) -> str:
    body = ["", "<!-- generated by docs/results.py from metrics/evaluate.json, "
            "reports/evaluate/samples.json and " + SEEDED_DEFAULT + " -->", ""]
    body += comparison(files)
    while body[-1] == "":
        body.pop()
    body += [""] + default_over_seeds(files)
    while body[-1] == "":
        body.pop()
    body += [""] + samples(files)
    while body[-1] == "":
        body.pop()
    return "\n".join(body) + "\n\n"


def with_region(text: str, region: str) -> str | None:
    """``text`` with the part between the markers replaced; None without both markers."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[: start + len(START)] + region + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if docs/results.md or README.md is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    files = Files(root)
    wanted = {RESULTS: results_md(files)}
    readme_path = root / README
    readme = readme_path.read_text() if readme_path.exists() else None
    new_readme = with_region(readme, readme_region(files)) if readme is not None else None
    if new_readme is None:
        print(f"{README}: no region between {START} and {END}", file=sys.stderr)
        return 1
    wanted[README] = new_readme
    # the figures quoted in the prose of every page (docs/figures.py)
    read = figures.reader(root)
    pages = [README, *sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md"))]
    for rel in pages:
        if rel == RESULTS:
            continue
        text = wanted.get(rel) or (root / rel).read_text()
        rendered, unknown = figures.render(text, read)
        if unknown:
            print(f"{rel}: no figure named {', '.join(unknown)} in docs/figures.py",
                  file=sys.stderr)
            return 1
        wanted[rel] = rendered
    stale = []
    for rel, text in wanted.items():
        path = root / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            path.write_text(text)
    if args.check:
        for rel in stale:
            where = " (the results region)" if rel == README else ""
            print(f"stale: {rel}{where}; run .venv/bin/python docs/results.py")
        if not stale:
            print(f"up to date: {len(wanted)} pages")
        return 1 if stale else 0
    print("wrote: " + ", ".join(stale) if stale else f"unchanged: {len(wanted)} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
