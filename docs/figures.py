"""Figures quoted in the prose of README.md and docs/*.md, rendered from committed files.

A page quotes a measurement inside a marked span:

    `make pipeline` runs <!-- figure:pipeline-minutes -->...<!-- /figure --> of stages

and ``docs/results.py`` replaces the span's text with what the figure's function below gives
from the files (``--check`` names a page whose span is stale). The rest of a page is prose,
and :func:`hand_typed` finds the measurements typed into it by hand; ``tests/test_docs.py``
holds them to the list in ``docs/hand_typed.json``, which may only shrink.

What counts as a hand-typed measurement (:data:`MEASUREMENT`): a number with a unit of time
(``s``, ``min``, ``ms``, ``h``), of speed (``tok/s``, ``GFLOP/s``, ``s/step``), of size (``MB``,
``GiB``), a percentage (not the level of an interval: "95% interval"), a ratio (``1.7x``; not a shape such as ``4 x 128``), or a decimal with three places or more (bits per
byte, accuracies, p-values). Code is not prose: fenced and indented blocks, inline code
(a command, a params value) and the generated regions are skipped, but a comment in a code
block is prose. It is a heuristic: "600 steps" is not caught (a default, not a measurement),
nor is "0.5" (two places), nor a figure spelled in words.

Standard library only (and ``stages.chain``), like docs/results.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPAN = re.compile(r"<!-- figure:([\w-]+) -->(.*?)<!-- /figure -->", re.S)
GENERATED = re.compile(r"<!-- results:start -->.*?<!-- results:end -->", re.S)
MEASUREMENT = re.compile(r"""(?x)
    (?<![\w.\-/])(?:
      \d[\d,]*(?:\.\d+)?\s?(?:ms|s|sec|seconds|min|minutes|h|hours)\b(?!/)
    | \d[\d,]*(?:\.\d+)?\s?k?\s?(?:tok/s|tokens/s|tokens\ per\ second|GFLOP/s|TFLOP/s
                                 |s/step|steps/s)
    | \d[\d,]*(?:\.\d+)?\s?(?:MB|GB|GiB|MiB|KB|kB|KiB)\b
    | \d[\d,]*(?:\.\d+)?\s?%(?!\s(?:t\s|Welch\s|Wilson\s)?(?:interval|confidence))
    | \d+(?:\.\d+)?\s?x\b(?!\s?\d)
    | \d\.\d{3,}\b
    )""")
INLINE_CODE = re.compile(r"`[^`]*`")

Json = dict[str, Any]
Read = Callable[[str], "Json | None"]


def hand_typed(text: str) -> list[tuple[int, str, str]]:
    """``(line number, figure, line)`` of every measurement typed into ``text``'s prose."""
    # blank out what is generated, keeping line numbers
    text = GENERATED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found, fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if line.lstrip().startswith(("<!--", "![")):
            continue
        if fence or line.startswith(("    ", "\t")):
            # code is not prose, but a comment in it is: "make compare  # ~30 min"
            prose = line.split(" # ", 1)[1] if " # " in line else ""
        else:
            prose = INLINE_CODE.sub("", line)
        prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets are paths, not figures
        found += [(number, m.group(0), line.strip()) for m in MEASUREMENT.finditer(prose)]
    return found


# --- the figures ---------------------------------------------------------------------------

FIGURES: dict[str, Callable[[Read], str]] = {}


def figure(name: str) -> Callable[[Callable[[Read], str]], Callable[[Read], str]]:
    def register(fn: Callable[[Read], str]) -> Callable[[Read], str]:
        FIGURES[name] = fn
        return fn
    return register


def _missing(rel: str) -> str:
    return f"(`{rel}` is missing)"


def _machine(text: str) -> str:
    """The machine's kind from a ``device``/``machine`` field: ``cpu with AVX-512 BF16``."""
    return text.split(",")[0].strip()


@figure("pipeline-minutes")
def pipeline_minutes(read: Read) -> str:
    """The committed default run: its stages' minutes and the machine they ran on."""
    from stages import chain  # the stages, as dvc.yaml declares them

    total, device = 0.0, None
    for stage in chain.stage_order(Path(__file__).resolve().parents[1]):
        data = read(f"metrics/{stage}.json")
        if not data or not isinstance(data.get(f"{stage}/stage_seconds"), (int, float)):
            return _missing(f"metrics/{stage}.json")
        total += data[f"{stage}/stage_seconds"]
        device = device or data.get(f"{stage}/device")
    where = f" on a 2-core {_machine(device)}" if isinstance(device, str) else ""
    return f"about {total / 60:.0f} minutes of stages{where}"


@figure("quick-compare-minutes")
def quick_compare_minutes(read: Read) -> str:
    """A quick comparison of 2 sides x 5 seeds, at the pace of the last quick one that was
    timed (``reports/compare/letters-quick.json``)."""
    rel = "reports/compare/letters-quick.json"
    data = read(rel)
    if not data or not data.get("seconds"):
        return _missing(rel)
    runs = len(data["seeds"]) * len(data["sides"]) - len(data.get("missing") or [])
    return f"about {data['seconds'] / runs * 10 / 60:.0f} min"


@figure("speedrun-setup")
def speedrun_setup(read: Read) -> str:
    """How the committed speedrun ran: machine, preset, budget per side."""
    rel = "reports/speedrun.json"
    data = read(rel)
    if not data:
        return _missing(rel)
    return (f"on a 2-core {_machine(data['machine'])} ({data['preset']}, "
            f"{data['budget_seconds']:.0f} s per side, one interleaved run, on the default "
            "shards, chat mix included)")


@figure("speedrun-verdict")
def speedrun_verdict(read: Read) -> str:
    """The committed speedrun's outcome: lower bpb at every checkpoint or not, and the
    speed ratio (llmcore's tokens per second over the peer's)."""
    rel = "reports/speedrun.json"
    data = read(rel)
    if not data or "llmcore_lower_bpb_at_every_checkpoint" not in data:
        return _missing(rel)
    lower = ("llmcore's held-out bpb is lower at every checkpoint"
             if data["llmcore_lower_bpb_at_every_checkpoint"]
             else "llmcore's held-out bpb is not lower at every checkpoint")
    return f"{lower}, at {data['tokens_per_s_ratio']:.2f}x the peer's tokens per second"


@figure("chat-share-docs-bpb")
def chat_share_docs_bpb(read: Read) -> str:
    """Docs val bpb of the pretrained model without the chat mix, against the default, over
    the seeds of ``reports/compare/seeds-quick.json``."""
    rel = "reports/compare/seeds-quick.json"
    data = read(rel) or {}
    try:
        row = data["metrics"]["evaluate/pretrain/val_bpb"]["against_baseline"][
            "pretrain-chat-share-0"]
    except (KeyError, TypeError):
        return _missing(rel)
    lo, hi = row["ci95"]
    return (f"{row['diff']:+.3f} bpb [{lo:.3f}, {hi:.3f}] without the chat mix, over "
            f"{len(data['seeds'])} seeds (verdict: {row['verdict']})")


def _fsdp(read: Read) -> Json | None:
    return read("reports/fsdp_memory.json")


@figure("fsdp-computed")
def fsdp_computed(read: Read) -> str:
    """Bytes per rank under DDP and FSDP, computed from the model's shapes."""
    data = _fsdp(read)
    if not data:
        return _missing("reports/fsdp_memory.json")
    rows = {(r["world"], r["opt"], r["parallel"]): r["total"] for r in data["computed"]["rows"]}
    names = {"muon": "Muon + AdamW", "adamw": "AdamW"}
    out = ["", "| world size | optimizer | `ddp` per rank | `fsdp` per rank | ratio |",
           "|---|---|---|---|---|"]
    for world, opt in sorted({(w, o) for w, o, _ in rows}, key=lambda k: (k[0], k[1] != "muon")):
        ddp, fsdp = rows[(world, opt, "ddp")], rows[(world, opt, "fsdp")]
        fsdp_gib = fsdp / 2**30
        out.append(f"| {world} | {names.get(opt, opt)} | {ddp / 2**30:.2f} GiB | "
                   f"{fsdp_gib:.3f} GiB | {ddp / fsdp:.1f}x |" if fsdp_gib < 0.5 else
                   f"| {world} | {names.get(opt, opt)} | {ddp / 2**30:.2f} GiB | "
                   f"{fsdp_gib:.2f} GiB | {ddp / fsdp:.1f}x |")
    return "\n".join(out) + "\n"


@figure("fsdp-measured-setup")
def fsdp_measured_setup(read: Read) -> str:
    data = _fsdp(read)
    if not data or not data.get("measured"):
        return _missing("reports/fsdp_memory.json")
    first = data["measured"][0]
    return (f"on a 2-core {data['machine']} CPU; {first['shape']}, "
            f"{first['params'] / 1e6:.1f}M parameters")


@figure("fsdp-measured")
def fsdp_measured(read: Read) -> str:
    """What each rank's local tensors held at world size 2, and its peak resident memory."""
    data = _fsdp(read)
    if not data or not data.get("measured"):
        return _missing("reports/fsdp_memory.json")
    mb = 2**20
    out = ["", "| parallel | rank | params | grads | optimizer | tensors (computed) | peak RSS |",
           "|---|---|---|---|---|---|---|"]
    for side in data["measured"]:
        computed = sum(side["computed"].values())
        for r in side["ranks"]:
            out.append(f"| {side['parallel']} | {r['rank']} | {r['params'] / mb:.1f} MB | "
                       f"{r['grads'] / mb:.1f} MB | {r['optimizer'] / mb:.1f} MB | "
                       f"{r['total'] / mb:.1f} MB ({computed / mb:.1f}) | "
                       f"{r['peak_rss'] / mb:.0f} MB |")
    return "\n".join(out) + "\n"


@figure("cpu-precision")
def cpu_precision(read: Read) -> str:
    """Training tokens/s in float32 and bf16 autocast per shape, on the machine of
    ``reports/precision_cpu.json`` (``benchmarks/train_throughput.py``, interleaved rounds)."""
    rel = "reports/precision_cpu.json"
    data = read(rel)
    if not data or not data.get("results"):
        return _missing(rel)
    speed = {(r["preset"], r["dtype"]): r for r in data["results"]}
    out = ["", f"On a 2-core {_machine(data['machine'])} (torch {data.get('torch', '-')}), "
           "one training step of the default loop (Muon), tokens/s:", "",
           "| preset | batch | float32 | bf16 autocast | bf16 / float32 |", "|---|---|---|---|---|"]
    for preset in dict.fromkeys(p for p, _ in speed):
        f32, b16 = speed.get((preset, "float32")), speed.get((preset, "bfloat16"))
        if not f32 or not b16:
            continue
        out.append(f"| {preset} | {f32['batch_size']} x {f32['seq_len']} | "
                   f"{f32['tokens_per_s']:,.0f} | {b16['tokens_per_s']:,.0f} | "
                   f"{b16['tokens_per_s'] / f32['tokens_per_s']:.2f}x |")
    return "\n".join(out) + "\n"


@figure("scaling-sweep")
def scaling_sweep(read: Read) -> str:
    """The pretraining recipe's sweep: the tagged runs of ``reports/scaling/runs.jsonl`` (one
    change per run against the default shape and budget), best docs val bpb bold."""
    rel = "reports/scaling/runs.jsonl"
    data = read(rel)
    rows = [r for r in (data or {}).get("rows", []) if r.get("tag")]
    if not rows:
        return _missing(rel)
    best = min(r["best_val_bpb"] for r in rows)
    out = ["", "| change | lr | rows per step | docs val bpb |", "|---|---|---|---|"]
    for r in rows:
        bpb = f"{r['best_val_bpb']:.3f}"
        out.append(f"| `{r['tag']}` | {r['lr']:g} | {r['batch_size']} | "
                   + (f"**{bpb}** |" if r["best_val_bpb"] == best else f"{bpb} |"))
    return "\n".join(out) + "\n"


def _grid(read: Read) -> dict[tuple[int, str, float], float] | None:
    """(vocab, shape, budget) -> best docs val bpb of the scaling grid's runs (untagged)."""
    data = read("reports/scaling/runs.jsonl")
    if not data:
        return None
    return {(r["vocab"], r["shape"], float(r["budget"])): r["best_val_bpb"]
            for r in data.get("rows", []) if not r.get("tag")}


@figure("scaling-vocab")
def scaling_vocab(read: Read) -> str:
    """Docs val bpb of vocabularies 2048 / 4096 / 6400 at 1e13 FLOPs, per shape of the grid."""
    grid = _grid(read)
    parts = []
    for shape in ("4x64", "4x96", "4x128"):
        bpb = [(grid or {}).get((v, shape, 1e13)) for v in (2048, 4096, 6400)]
        if None in bpb:
            return _missing("reports/scaling/runs.jsonl")
        parts.append(" / ".join(f"{b:.3f}" for b in bpb) + f" ({shape.replace('x', ' x ')})")
    return "docs val bpb " + ", ".join(parts)


@figure("scaling-shape")
def scaling_shape(read: Read) -> str:
    """Docs val bpb of the grid's shapes at vocabulary 4096 and 1e13 FLOPs, best first."""
    grid = _grid(read)
    runs = sorted((b, shape) for (v, shape, f), b in (grid or {}).items()
                  if v == 4096 and f == 1e13 and shape in ("2x64", "4x64", "4x96", "4x128"))
    if len(runs) < 4:
        return _missing("reports/scaling/runs.jsonl")
    (best, name), rest = runs[0], runs[1:]
    return (f"{name.replace('x', ' x ')}: {best:.3f}; "
            + ", ".join(f"{s.replace('x', ' x ')} {b:.3f}" for b, s in rest))


DEFAULT_QUOTE = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)` \(default:? ([^;),]+)")


def stale_defaults(text: str, params: Json) -> list[str]:
    """Defaults quoted in prose as `` `section.key` (default VALUE`` whose value is not
    params.yaml's (or whose key params.yaml lacks): one line each."""
    out = []
    for key, quoted in DEFAULT_QUOTE.findall(text):
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        words = quoted.strip().split()
        value = words[0] if words else ""
        if node is None:
            out.append(f"`{key}`: not a key of params.yaml")
        elif str(node).lower() != value.lower() and _number(node) != _number(value):
            out.append(f"`{key}` (default {value}): params.yaml has {node!r}")
    return out


def _number(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None


def render(text: str, read: Read) -> tuple[str, list[str]]:
    """``text`` with every figure span rendered; the unknown figure names."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        fn = FIGURES.get(m.group(1))
        if fn is None:
            unknown.append(m.group(1))
            return m.group(0)
        return f"<!-- figure:{m.group(1)} -->{fn(read)}<!-- /figure -->"

    return SPAN.sub(one, text), unknown


def reader(root: Path) -> Read:
    """``read(rel)``: a JSON file's object, or a JSON-lines file's records as ``{"rows": [...]}``;
    None where the file is missing or unreadable."""
    def read(rel: str) -> Json | None:
        try:
            text = (root / rel).read_text()
            if rel.endswith(".jsonl"):
                return {"rows": [json.loads(line) for line in text.splitlines() if line.strip()]}
            data = json.loads(text)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
    return read
