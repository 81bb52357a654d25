"""The default run's tables: what ``make pipeline`` wrote to ``metrics/*.json``, the four
models side by side, then each stage's own figures and times."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from docs.tables.base import (
    MODELS,
    STAGES,
    TASK_LABELS,
    Files,
    Json,
    dig,
    key_table,
    minutes,
    missing,
    num,
    pct,
    ratio,
    table,
    whole,
    with_ci,
)
from llmcore import metric_keys as keys


def models_in(ev: Json) -> list[tuple[str, str]]:
    return [(m, label) for m, label in MODELS if keys.model_metric(m, keys.DOCS_BPB) in ev]


def tasks_in(ev: Json, models: Sequence[tuple[str, str]]) -> list[str]:
    suffix = keys.exact_match("")  # "_exact_match"
    split = tuple(keys.exact_match("", kind) for kind in (keys.MULTI, keys.SINGLE))
    found = {k.split("/")[2][: -len(suffix)] for k in ev
             if k.startswith(keys.EVALUATE + "/") and k.endswith(suffix) and k.count("/") == 2
             and not k.endswith(split)}
    order = [t for t in TASK_LABELS if t in found] + sorted(found - set(TASK_LABELS))
    return [t for t in order
            if any(keys.model_metric(m, keys.exact_match(t)) in ev for m, _ in models)]


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
        return [fmt(keys.model_metric(m, metric)) for m, _ in models]

    def acc(metric: str) -> Callable[[str], str]:
        return lambda k: with_ci(ev.get(k), ev.get(k + "_ci95_low"), ev.get(k + "_ci95_high"))

    base = f" (unigram baseline {unigram:.2f})" if isinstance(unigram, (int, float)) else ""
    mc = (f"{choices}-way multiple choice (chance {1 / choices:.2f})"
          if isinstance(choices, int) and choices > 0 else "multiple choice")
    rows = [[f"bits per byte, test docs{base}", *cells(keys.DOCS_BPB, lambda k: num(ev.get(k)))],
            ["bits per byte, test SFT replies", *cells(keys.SFT_BPB, lambda k: num(ev.get(k)))],
            [f"doc questions, {mc}", *cells("doc_mc_accuracy", acc("doc_mc_accuracy"))]]
    tasks = tasks_in(ev, models)
    for task in tasks:
        metric = keys.exact_match(task)
        rows.append([f"{TASK_LABELS.get(task, task)} exact match", *cells(metric, acc(metric))])
        for kind, what in ((keys.MULTI, "words of several tokens"),
                           (keys.SINGLE, "one-token words")):
            metric = keys.exact_match(task, kind)
            if any(keys.model_metric(m, metric) in ev for m, _ in models):
                n = ev.get(keys.model_metric(models[-1][0], f"{task}_{kind}_n"))
                rows.append([f"&nbsp;&nbsp;on {what} (n = {whole(n)})",
                             *cells(metric, acc(metric))])
    rows.append(["replies that end with `<|im_end|>`",
                 *cells(keys.IM_END_RATE, lambda k: num(ev.get(k)))])
    out = table(["", *(label for _, label in models)], rows)

    def sizes(name: str) -> set[Any]:
        return {ev.get(keys.model_metric(m, f"{name}_n")) for m, _ in models} - {None}

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
    factors = sorted({f for k in ev if (f := keys.context_factor(k.rsplit("/", 1)[-1]))})
    seq_len = dig(files.params(), "pack", "seq_len")
    head = [f"{f}x ({f * seq_len})" if isinstance(seq_len, int) else f"{f}x" for f in factors]
    rows = [[label, *(num(ev.get(keys.model_metric(m, keys.bpb_at_context(f)))) for f in factors)]
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
    pre = keys.CONTAMINATION
    sets = sorted({k[len(pre):].split("/")[0] for k in ev if k.startswith(pre)})
    if not sets:
        return ["_`metrics/evaluate.json` holds no contract check: it was written before "
                "the check ran on every evaluation (`dvc repro evaluate`)._", ""]
    streams = sorted({k.rsplit("/", 1)[1] for k in ev if k.startswith(pre)}
                     - {"examples", "contaminated"})
    rows = [[s, *(whole(ev.get(keys.contamination_metric(s, c)))
                  for c in ("examples", "contaminated", *streams))] for s in sets]
    out = [f"Contract violations: {whole(ev.get(keys.contract_metric('violations')))} (a "
           "violation stops the evaluate stage). Test words whose every token is spelled in "
           "some training word: "
           f"{pct(ev.get(keys.contract_metric('test_words_token_covered')))}.", ""]
    out += table(["set", "test examples", "share a run", *(f"via {st}" for st in streams)],
                 rows)
    models = models_in(ev)
    if not models:
        return out
    metrics = sorted({k.split("/", 2)[2][: -len("_clean")] for k in ev
                      if k.endswith("_clean") and k.startswith(keys.model_metric(models[0][0], ""))})

    def cell(m: str, metric: str) -> str:
        n = ev.get(keys.model_metric(m, f"{metric}_clean_n"))
        left = "" if n is None else f" (n={n})"
        every, clean = ev.get(keys.model_metric(m, metric)), ev.get(keys.model_metric(m, f"{metric}_clean"))
        return f"{num(every)} / {num(clean)}{left}"

    out += ["Every example / without the ones that share a run (examples left):", ""]
    out += table(["metric", *(label for _, label in models)],
                 [[metric, *(cell(m, metric) for m, _ in models)] for metric in metrics])
    return out



# what each stage's table shows, in order: (key after ``<stage>/``, label, format); pretrain
# and sft share theirs, rl has its own section (a table of tasks after its figures)
Row = tuple[str, str, Callable[[Any], str]]
STAGE_ROWS: dict[str, list[Row]] = {
    "fetch": [
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
    ],
    "tokenizer": [
        ("vocab_size", "vocabulary", whole),
        ("bytes_per_token_val", "bytes per token, val", lambda v: num(v, 2)),
        ("train_texts", "texts trained on", whole),
    ],
    "pack": [
        ("tokens", "tokens in all shards", whole),
        ("pretrain_train_rows", "pretraining rows, train", whole),
        ("pretrain_val_rows", "pretraining rows, val", whole),
        ("pretrain_chat_share", "share of pretraining tokens from SFT conversations", num),
        ("pretrain_chat_conversations", "SFT conversations in the pretraining stream", whole),
        ("sft_train_rows", "SFT rows, train", whole),
        ("sft_train_padded_fraction", "SFT rows' padded fraction, train", pct),
        ("sft_train_truncated", "SFT conversations truncated, train", whole),
        ("tokens_per_second", "packing tokens/s", whole),
    ],
    "train": [
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
    ],
    "dpo": [
        ("train_pairs", "training pairs", whole),
        ("on_policy_rejected", "of which the SFT model's own wrong answer is rejected", whole),
        ("val_pairs", "val pairs", whole),
        ("val_reward_accuracy", "val reward accuracy", num),
        ("val_reward_margin", "val reward margin", num),
        ("val_loss", "val DPO loss", num),
        ("kl_to_reference", "KL to the reference (on the policy's samples)", num),
        ("trainable_share", "trainable share", pct),
    ],
    "quantize": [
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
    ],
}


def stage_table(files: Files, stage: str, rows: Sequence[Row]) -> list[str]:
    """``### <stage>`` and the figures of ``metrics/<stage>.json`` that it has."""
    data = files.get(f"metrics/{stage}.json")
    out = [f"### {stage}", ""]
    out += missing(f"metrics/{stage}.json", f"`dvc repro {stage}`") if data is None else \
        key_table(data, f"{stage}/", rows)
    return out


def stage_sections(files: Files) -> list[str]:
    """Every stage's own figures, fetch to quantize; the training stages name their machine."""
    out: list[str] = []
    for stage in ("fetch", "tokenizer", "pack"):
        out += stage_table(files, stage, STAGE_ROWS[stage])
    for stage in ("pretrain", "sft"):
        out += stage_table(files, stage, STAGE_ROWS["train"])
        data = files.get(f"metrics/{stage}.json")
        if data and data.get(f"{stage}/device"):
            out += [f"Machine: {data[f'{stage}/device']}.", ""]
    out += stage_table(files, "dpo", STAGE_ROWS["dpo"])
    out += rl_section(files)
    out += stage_table(files, "quantize", STAGE_ROWS["quantize"])
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
        seconds = data.get(keys.stage_seconds(stage))
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

