"""Figures of the benchmarks: FSDP's memory per rank, CPU precision."""

from __future__ import annotations

from docs.figures import Json, Read, figure, machine_kind, missing


def _fsdp(read: Read) -> Json | None:
    return read("reports/fsdp_memory.json")


@figure("fsdp-computed")
def fsdp_computed(read: Read) -> str:
    """Bytes per rank under DDP and FSDP, computed from the model's shapes."""
    data = _fsdp(read)
    if not data:
        return missing("reports/fsdp_memory.json")
    rows = {(r["world"], r["opt"], r["parallel"]): r["total"] for r in data["computed"]["rows"]}
    names = {"muon": "Muon + AdamW", "adamw": "AdamW"}
    out = [
        "",
        "| world size | optimizer | `ddp` per rank | `fsdp` per rank | ratio |",
        "|---|---|---|---|---|",
    ]
    for world, opt in sorted({(w, o) for w, o, _ in rows}, key=lambda k: (k[0], k[1] != "muon")):
        ddp, fsdp = rows[(world, opt, "ddp")], rows[(world, opt, "fsdp")]
        fsdp_gib = fsdp / 2**30
        out.append(
            f"| {world} | {names.get(opt, opt)} | {ddp / 2**30:.2f} GiB | "
            f"{fsdp_gib:.3f} GiB | {ddp / fsdp:.1f}x |"
            if fsdp_gib < 0.5
            else f"| {world} | {names.get(opt, opt)} | {ddp / 2**30:.2f} GiB | "
            f"{fsdp_gib:.2f} GiB | {ddp / fsdp:.1f}x |"
        )
    return "\n".join(out) + "\n"


@figure("fsdp-measured-setup")
def fsdp_measured_setup(read: Read) -> str:
    data = _fsdp(read)
    if not data or not data.get("measured"):
        return missing("reports/fsdp_memory.json")
    first = data["measured"][0]
    return (
        f"on a 2-core {data['machine']} CPU; {first['shape']}, "
        f"{first['params'] / 1e6:.1f}M parameters"
    )


@figure("fsdp-measured")
def fsdp_measured(read: Read) -> str:
    """What each rank's local tensors held at world size 2, and its peak resident memory."""
    data = _fsdp(read)
    if not data or not data.get("measured"):
        return missing("reports/fsdp_memory.json")
    mb = 2**20
    out = [
        "",
        "| parallel | rank | params | grads | optimizer | tensors (computed) | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in data["measured"]:
        computed = sum(side["computed"].values())
        for r in side["ranks"]:
            out.append(
                f"| {side['parallel']} | {r['rank']} | {r['params'] / mb:.1f} MB | "
                f"{r['grads'] / mb:.1f} MB | {r['optimizer'] / mb:.1f} MB | "
                f"{r['total'] / mb:.1f} MB ({computed / mb:.1f}) | "
                f"{r['peak_rss'] / mb:.0f} MB |"
            )
    return "\n".join(out) + "\n"


@figure("cpu-precision")
def cpu_precision(read: Read) -> str:
    """Training tokens/s in float32 and bf16 autocast per shape, on the machine of
    ``reports/precision_cpu.json`` (``benchmarks/train_throughput.py``, interleaved rounds)."""
    rel = "reports/precision_cpu.json"
    data = read(rel)
    if not data or not data.get("results"):
        return missing(rel)
    speed = {(r["preset"], r["dtype"]): r for r in data["results"]}
    out = [
        "",
        f"On a 2-core {machine_kind(data['machine'])} (torch {data.get('torch', '-')}), "
        "one training step of the default loop (Muon), tokens/s:",
        "",
        "| preset | batch | float32 | bf16 autocast | bf16 / float32 |",
        "|---|---|---|---|---|",
    ]
    for preset in dict.fromkeys(p for p, _ in speed):
        f32, b16 = speed.get((preset, "float32")), speed.get((preset, "bfloat16"))
        if not f32 or not b16:
            continue
        out.append(
            f"| {preset} | {f32['batch_size']} x {f32['seq_len']} | "
            f"{f32['tokens_per_s']:,.0f} | {b16['tokens_per_s']:,.0f} | "
            f"{b16['tokens_per_s'] / f32['tokens_per_s']:.2f}x |"
        )
    return "\n".join(out) + "\n"


@figure("compile-step")
def compile_step(read: Read) -> str:
    """Seconds per training step, eager / blocks compiled / whole model compiled, per shape
    (``benchmarks/compile_step.py``, interleaved rounds)."""
    rel = "reports/compile_step.json"
    data = read(rel)
    if not data or not data.get("results"):
        return missing(rel)
    by = {(r["shape"], r["mode"]): r for r in data["results"]}
    modes = [m for m in ("eager", "blocks", "whole") if any(k[1] == m for k in by)]
    out = ["", f"On a 2-core {machine_kind(data['machine'])} (torch {data.get('torch', '-')}), "
           f"{data['results'][0]['preset']}, seconds per optimizer step (median of "
           f"{len(data['results'][0]['seconds_per_step_rounds'])} interleaved rounds; the "
           "first steps, which build the kernels, apart: the first shape's build starts from an "
           "empty cache, the later ones reuse part of it):", "",
           "| shape | " + " | ".join(modes) + f" | first {data.get('warmup_steps', '-')} steps: "
           + " / ".join(modes) + " |",
           "|---|" + "---|" * (len(modes) + 1)]
    for shape in dict.fromkeys(k[0] for k in by):
        row = [by.get((shape, m)) for m in modes]
        eager = by.get((shape, "eager"))
        cells = [f"{r['seconds_per_step']:.3f}" + (
            f" ({r['seconds_per_step'] / eager['seconds_per_step']:.2f}x)"
            if eager and r is not eager else "") if r else "-" for r in row]
        first = " / ".join(f"{r['first_steps_s']:.0f} s" if r else "-" for r in row)
        b = next(r for r in row if r)
        out.append(f"| {shape} ({b['batch_size']} x {b['seq_len']}) | " + " | ".join(cells)
                   + f" | {first} |")
    return "\n".join(out) + "\n"


DECODE_BEFORE = "reports/history/2026-12-02-decode_speed-before.json"
DECODE_NOW = "reports/decode_speed.json"


def _rates(read: Read, rel: str) -> dict[str, dict[str, float]] | None:
    """batch -> side -> tokens/s of a ``benchmarks/decode_speed.py`` report."""
    data = read(rel)
    if not data or "batches" not in data:
        return None
    return {b: v["tok_s"] for b, v in data["batches"].items()}


@figure("decode-gain")
def decode_gain(read: Read) -> str:
    """The engine's tokens/s before and after the decode-step work, eager and compiled, at
    batch 1 and 8, from the dated report and the current one."""
    before, now = _rates(read, DECODE_BEFORE), _rates(read, DECODE_NOW)
    if not before or not now:
        return missing(DECODE_BEFORE if not before else DECODE_NOW)
    ops = (read(DECODE_NOW) or {}).get("profile", {}).get("ops_per_token")

    def pair(side: str, batch: str) -> str:
        return f"{before[batch][side]:,.0f} -> {now[batch][side]:,.0f}"

    return ((f"~{ops:,.0f} operator calls per token; " if ops else "")
            + f"the eager engine {pair('engine', '1')} tokens/s at batch 1 and "
            f"{pair('engine', '8')} at batch 8, the compiled engine {pair('engine_compiled', '1')}"
            f" and {pair('engine_compiled', '8')}")


@figure("decode-noise")
def decode_noise(read: Read) -> str:
    """How far llama.cpp's own batch-1 rate moved between the two runs: the machine's noise."""
    before, now = _rates(read, DECODE_BEFORE), _rates(read, DECODE_NOW)
    if not before or not now:
        return missing(DECODE_BEFORE)
    a, b = before["1"]["llama.cpp f32"], now["1"]["llama.cpp f32"]
    return f"by {abs(b / a - 1):.0%}"


@figure("decode-llama-batch1")
def decode_llama_batch1(read: Read) -> str:
    """llama.cpp f32 at batch 1 against the compiled engine, in the current report's run."""
    now = _rates(read, DECODE_NOW)
    if not now:
        return missing(DECODE_NOW)
    llama, engine = now["1"]["llama.cpp f32"], now["1"]["engine_compiled"]
    return f"f32: {llama:,.0f} tokens/s in the same run, {llama / engine:.1f}x the compiled engine"


@figure("serve-decode-single")
def serve_decode_single(read: Read) -> str:
    """One client through the server before and after the decode-step work (two runs of each,
    alternated: ``reports/history/2026-12-02-serve_load-decode-*.json``)."""
    one: dict[str, list[dict]] = {"before": [], "after": []}
    for side in one:
        for suffix in ("", "2"):
            rel = f"reports/history/2026-12-02-serve_load-decode-{side}{suffix}.json"
            data = read(rel)
            if not data:
                return missing(rel)
            one[side] += [lv for lv in data["levels"] if lv["clients"] == 1]
    gaps = [lv["token_p50_ms"] for lv in one["before"] + one["after"]]

    def rates(side: str) -> str:
        return " and ".join(f"{lv['tokens_per_s']:,.0f}" for lv in one[side])

    return (f"{rates('before')} tokens/s before, {rates('after')} after, with a "
            f"{min(gaps):.1f}-{max(gaps):.1f} ms p50 gap between streamed pieces either way")


@figure("avx2-muon-cliff")
def avx2_muon_cliff(read: Read) -> str:
    """``torch.optim.Muon``'s step (bf16 iteration) over an AdamW step, with the kernels capped
    to AVX2 and as they are (``benchmarks/train_throughput.py``, two reports)."""
    key = "cpu-small/float32/torch-muon_over_adamw"
    ratios = []
    for rel in ("reports/train_throughput_avx2cap.json", "reports/train_throughput.json"):
        value = ((read(rel) or {}).get("step_time_ratios") or {}).get(key)
        if value is None:
            return missing(rel)
        ratios.append(value)
    return f"{ratios[0]:.1f}x an AdamW step's time with AVX2 kernels, {ratios[1]:.1f}x as it is"


@figure("serve-batched-prefill")
def serve_batched_prefill(read: Read) -> str:
    """32 streaming clients and the in-process bound before and after the batched prefill and
    the per-step delivery of events (``reports/history/2026-12-07-serve_load*-{before,after}.json``,
    one after the other on one machine)."""
    parts = []
    for tag, what in (("", "at the default shape"), ("-27m", "at the 27M shape")):
        runs = []
        for side in ("before", "after"):
            rel = f"reports/history/2026-12-07-serve_load{tag}-{side}.json"
            data = read(rel)
            if not data:
                return missing(rel)
            top = max(data["levels"], key=lambda lvl: lvl["clients"])
            runs.append((top["tokens_per_s"], top["ttft_p50_ms"],
                         data["in_process"]["tokens_per_s"]))
        (s0, t0, b0), (s1, t1, b1) = runs
        parts.append(f"{what}, 32 clients {s0:,.0f} -> {s1:,.0f} tok/s (first token p50 "
                     f"{t0:.0f} -> {t1:.0f} ms), the engine in process {b0:,.0f} -> {b1:,.0f}")
    return "; ".join(parts)


@figure("serve-vs-in-process")
def serve_vs_in_process(read: Read) -> str:
    """The busiest level of ``serve_load`` against the same engine in process, at the default
    shape and at 27M (``reports/serve_load.json``, ``reports/serve_load-27m.json``)."""
    parts = []
    for rel, what in (("reports/serve_load.json", "at the default shape"),
                      ("reports/serve_load-27m.json", "at the 27M shape")):
        data = read(rel)
        if not data or data.get("http_vs_in_process") is None:
            return missing(rel)
        top = max(data["levels"], key=lambda lvl: lvl["clients"])
        parts.append(f"{data['http_vs_in_process']:.2f}x {what} ({top['tokens_per_s']:,.0f} "
                     f"against {data['in_process']['tokens_per_s']:,.0f} tok/s, the clients "
                     f"taking {top.get('client_cores', float('nan')):.2f} of the cores)")
    return "; ".join(parts)
