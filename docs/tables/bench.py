"""The benchmarks' tables: what the scripts in ``benchmarks/`` wrote to ``reports/``
(throughput, decoding, serving, the speedrun, scaling, the recipe probes, the exports checked
in other tools) and which stages an edit re-runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from docs.tables.base import ROOT, Files, Json, dig, minutes, missing, num, pct, ratio, table, whole


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


DECODE_BEFORE = "reports/history/2026-12-02-decode_speed-before.json"


def decode(files: Files, rel: str = "reports/decode_speed.json",
           before_rel: str | None = DECODE_BEFORE) -> list[str]:
    """One ``benchmarks/decode_speed.py`` report: tokens/s per side and batch, agreement,
    the round-by-round ratios the targets are read on, and its facts."""
    data = files.get(rel)
    if data is None:
        return missing(rel, "`benchmarks/decode_speed.py`")
    batches = data.get("batches") or {}
    if not batches:
        return [f"_`{rel}` holds no decode rates (`batches`)._", ""]
    before = ((files.get(before_rel) or {}).get("batches") or {}) if before_rel else {}
    labels = {"generate": "`llmcore.infer.generate`", "engine": "the serving engine",
              "engine_compiled": "the engine, `--compile`",
              "llmcore int8": "the engine, int8 weights (`auto` runtime)",
              "transformers": "transformers `generate`"}
    names = list(dict.fromkeys(k for b in batches.values() for k in b.get("tok_s", {})))
    header = ["decoder"]
    for b in batches:
        header += [f"batch {b}: tokens/s"] + ([f"batch {b}: before"] if b in before else [])
    reference = dig(batches, next(iter(batches)), "agreement_with") or "generate"
    header.append(f"agreement with {labels.get(reference, reference)} (batch 1)")
    rows = []
    for name in names:
        row = [labels.get(name, name)]
        for b, d in batches.items():
            row.append(num(dig(d, "tok_s", name), 1))
            if b in before:
                row.append(num(dig(before, b, "tok_s", name), 1))
        agree = dig(batches, "1", "agreement_with_generate", name)
        row.append("-" if name == reference else num(agree))
        rows.append(row)
    out = table(header, rows)
    ratios = [(b, pair, r) for b, d in batches.items() for pair, r in (d.get("ratios") or {}).items()]
    if ratios:
        out += ["Round by round (each round ran every side once):", ""]
        out += table(["batch", "ratio", "mean", "95% t interval"],
                     [[b, pair, f"{num(r.get('mean'), 2)}x",
                       f"[{num(dig(r, 'ci95', 0), 2)}, {num(dig(r, 'ci95', 1), 2)}]"]
                      for b, pair, r in ratios])
    model = data.get("model") or {}
    facts = [f"{data.get('tokens', '-')} greedy new tokens per sequence, median of "
             f"{data.get('rounds', '-')} interleaved rounds, {data.get('threads', '-')} threads",
             f"machine: {data.get('machine', 'not recorded in the file')}"]
    if model:
        facts.append(f"model: {model.get('source', '-')} ({model.get('n_layers')} layers x "
                     f"{model.get('d_model')}, {model.get('n_heads')} / {model.get('n_kv_heads')}"
                     f" heads, MLP {model.get('d_ff')}, vocabulary {model.get('vocab_size')})")
    if dig(data, "profile", "per_token_ms") is not None:
        facts.append(f"the engine at batch 1 profiled: {num(dig(data, 'profile', 'per_token_ms'))}"
                     f" ms and {num(dig(data, 'profile', 'ops_per_token'), 1)} torch ops per "
                     "token")
    facts += [f"{k} not run: {v}" for k, v in (data.get("skipped") or {}).items()]
    if before:
        facts.append(f"\"before\": `{before_rel}`, the same benchmark on the code before the "
                     "decode work")
    return out + ["; ".join(facts) + ".", ""]


def _over(a: Any, b: Any) -> str:
    """``a / b`` as a ratio, "-" unless both are positive numbers."""
    ok = all(isinstance(v, (int, float)) and v > 0 for v in (a, b))
    return ratio(a / b) if ok else "-"


def int8_kernels(files: Files) -> list[str]:
    """``benchmarks/int8_kernels.py``: one decode product per runtime, as the machine is and
    with its kernels capped to AVX2."""
    out = []
    for rel in ("reports/int8_kernels.json", "reports/int8_kernels-avx2cap.json"):
        data = files.get(rel)
        if data is None:
            out += missing(rel, "`benchmarks/int8_kernels.py`")
            continue
        sides = list(dict.fromkeys(k for p in data.get("products", [])
                                   for k in (p.get("us") or {})))
        rows = [[f"{p.get('rows')} x {p.get('in')} @ {p.get('in')} x {p.get('out')}",
                 *(num(p["us"].get(sd), 1) for sd in sides),
                 _over(dig(p, "us", "float32"), dig(p, "us", "int8 x bf16, casts"))]
                for p in data.get("products", []) if isinstance(p.get("us"), dict)]
        out += [f"`{rel}`: {data.get('machine', '-')}, {data.get('threads', '-')} threads, best "
                f"of {data.get('rounds', '-')} rounds, microseconds per product; `auto` runs "
                f"{data.get('runtime_auto', '-')}:", ""]
        out += table(["product", *sides, "float32 / int8 with casts"], rows)
    return out


def serve_load(files: Files) -> list[str]:
    runs = [(label, rel, files.get(rel)) for label, rel in (
        ("one at a time", "reports/serve_load-before.json"),
        ("batched", "reports/serve_load.json"),
        ("batched, `--compile`", "reports/serve_load-compiled.json"),
        ("batched, 27M shape", "reports/serve_load-27m.json"))]
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
            lvl: Json = next((x for x in data.get("levels", []) if x.get("clients") == clients),
                             {})
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
                   + in_process(data) + f"machine: {data.get('machine', 'not recorded')}.")
    return out + [f"- Errors, all runs and levels: {errors}.", ""]


def in_process(data: Json) -> str:
    """The busiest level's rate over the same engine's in this process (no HTTP), when the
    report measured it."""
    bound = data.get("in_process") or {}
    if not bound.get("tokens_per_s") or data.get("http_vs_in_process") is None:
        return ""
    return (f"{bound['requests_at_once']} clients over the engine in process on "
            f"{bound['requests_at_once']} requests at once ({whole(bound['tokens_per_s'])} "
            f"tok/s, before and after the server): {ratio(data['http_vs_in_process'])}; ")


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
    runs = [(rel, d) for rel in rels if (d := files.get(rel)) is not None]
    if not runs:
        return missing("reports/hf_compat-*.json", "`benchmarks/hf_compat.py`")
    rows = [(d.get("transformers", "-"), num(d.get("rope_theta_read"), 0),
             num(d.get("rope_theta_expected"), 0), str(d.get("max_abs_logit_diff", "-")),
             num(d.get("top1_agreement")), f"`{rel}`") for rel, d in runs]
    return table(("transformers", "rope theta read", "expected", "max abs logit diff",
                  "top-1 agreement", "file"), rows)



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
