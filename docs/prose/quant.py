"""Figures of quantized decode: the kernels' products, whole-model decode at three
shapes, what the runtimes cost a trained model."""

from __future__ import annotations

from docs.figures import Read, figure, missing


def _kernel_ratio(read: Read, rel: str, shapes: list[tuple[int, int]],
                  side: str = "int8 x bf16, casts") -> str:
    """float32 over ``side`` per decode product of one row, from one report."""
    data = read(rel)
    if not data or not data.get("products"):
        return missing(rel)
    by = {(p["in"], p["out"], p["rows"]): p["us"] for p in data["products"]}
    parts = []
    for k, n in shapes:
        us = by.get((k, n, 1))
        if us is None:
            return missing(rel)
        if side not in us:
            return missing(rel)
        parts.append(f"{us['float32'] / us[side]:.1f}x at {k} x {n}")
    return ", ".join(parts)


@figure("int8-kernel-gain")
def int8_kernel_gain(read: Read) -> str:
    """How much faster one decode product is with int8 weights and bf16 activations than in
    float32, at the default's, the 27M shape's and the 0.5B shape's sizes."""
    return _kernel_ratio(read, "reports/int8_kernels.json", [(128, 352), (512, 1536), (1536, 4096)])


@figure("int8-kernel-avx2")
def int8_kernel_avx2(read: Read) -> str:
    """The same with torch's kernels capped to AVX2."""
    return _kernel_ratio(read, "reports/int8_kernels-avx2cap.json",
                         [(128, 352), (512, 1536), (1536, 4096)])


@figure("w8a8-kernel-gain")
def w8a8_kernel_gain(read: Read) -> str:
    """float32 over int8 products (the W8A8 layer, rounding of the row included), one row."""
    return _kernel_ratio(read, "reports/int8_kernels.json",
                         [(128, 352), (512, 1536), (1536, 4096)], "w8a8")


@figure("int4-kernel")
def int4_kernel(read: Read) -> str:
    """float32 over the int4 kernel (with its casts), one row, on this machine and capped to
    AVX2."""
    shapes = [(512, 1536), (1536, 4096), (4096, 1536)]
    side = "int4 x bf16, casts"
    return (f"{_kernel_ratio(read, 'reports/int8_kernels.json', shapes, side)} on this machine, "
            f"{_kernel_ratio(read, 'reports/int8_kernels-avx2cap.json', shapes, side)} capped "
            "to AVX2")


def _ratio(read: Read, rel: str, pair: str, batch: str) -> str:
    """A round-by-round ratio of a decode_speed report: mean and 95% interval."""
    r = (((read(rel) or {}).get("batches") or {}).get(batch) or {}).get("ratios", {}).get(pair)
    if not r or r.get("mean") is None:
        return missing(rel)
    lo, hi = r["ci95"]
    return f"{r['mean']:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def _batches_1_and_8(read: Read, rel: str, pair: str) -> str:
    return f"{_ratio(read, rel, pair, '1')} at batch 1 and {_ratio(read, rel, pair, '8')} at batch 8"


@figure("int8-decode-27m")
def int8_decode_27m(read: Read) -> str:
    """int8 engine over float engine at the 27M shape, batch 1 and 8."""
    return _batches_1_and_8(read, "reports/decode_speed-27m.json", "llmcore int8 / engine")


@figure("int8-decode-05b")
def int8_decode_05b(read: Read) -> str:
    """int8 engine over the float engine and over llama.cpp q8_0 at the 0.5B shape, batch 1,
    eager and compiled."""
    rel = "reports/decode_speed-0.5b.json"
    return (f"int8 decodes {_ratio(read, rel, 'llmcore int8 / engine', '1')} the float32 "
            f"engine's rate and {_ratio(read, rel, 'llmcore int8 / llama.cpp q8_0', '1')} "
            "llama.cpp q8_0's (compiled: "
            f"{_ratio(read, rel, 'llmcore int8 compiled / llama.cpp q8_0', '1')})")


@figure("int4-vs-q4")
def int4_vs_q4(read: Read) -> str:
    """int4 engine over llama.cpp q4_0 at the 0.5B shape, batch 1, eager and compiled."""
    rel = "reports/decode_speed-0.5b.json"
    return (f"{_ratio(read, rel, 'llmcore int4 / llama.cpp q4_0', '1')} llama.cpp q4_0's "
            f"(compiled: {_ratio(read, rel, 'llmcore int4 compiled / llama.cpp q4_0', '1')})")


@figure("int4-decode")
def int4_decode(read: Read) -> str:
    """int4 engine over the float and the int8 engine at the 0.5B and 27M shapes, batch 1 and
    8 (``reports/decode_speed-{0.5b,27m}.json``: the three in the same rounds)."""
    parts = []
    for rel, what in (("reports/decode_speed-0.5b.json", "at the 0.5B shape"),
                      ("reports/decode_speed-27m.json", "at the 27M shape")):
        parts.append(f"{what}, over the float32 engine "
                     f"{_batches_1_and_8(read, rel, 'llmcore int4 / engine')}, over the int8 "
                     f"engine {_batches_1_and_8(read, rel, 'llmcore int4 / llmcore int8')}")
    return "; ".join(parts)


@figure("quant-compiled-05b")
def quant_compiled_05b(read: Read) -> str:
    """int8 and int4 engines compiled over the compiled float engine at the 0.5B shape
    (``reports/decode_speed-0.5b.json``)."""
    rel = "reports/decode_speed-0.5b.json"
    return (f"int8 {_batches_1_and_8(read, rel, 'llmcore int8 compiled / engine_compiled')}, "
            f"int4 {_batches_1_and_8(read, rel, 'llmcore int4 compiled / engine_compiled')}")


@figure("int8-decode-avx2")
def int8_decode_avx2(read: Read) -> str:
    """int8 over float32 engine with torch's kernels capped to AVX2, 27M and 0.5B shapes."""
    return "; ".join(
        f"{what}, {_batches_1_and_8(read, rel, 'llmcore int8 / engine')}"
        for rel, what in (("reports/decode_speed-27m-avx2cap.json", "27M shape"),
                          ("reports/decode_speed-0.5b-avx2cap.json", "0.5B shape")))


@figure("int4-decode-avx2")
def int4_decode_avx2(read: Read) -> str:
    """int4 over float32 engine at the 0.5B shape with torch's kernels capped to AVX2."""
    return _batches_1_and_8(read, "reports/decode_speed-0.5b-avx2cap.json", "llmcore int4 / engine")


@figure("compiled-vs-llama-27m")
def compiled_vs_llama_27m(read: Read) -> str:
    """The compiled engine over llama.cpp f32 at the 27M shape, batch 1 and 8."""
    return _batches_1_and_8(read, "reports/decode_speed-27m.json",
                            "engine_compiled / llama.cpp f32")


@figure("quantize-default-ratio")
def quantize_default_ratio(read: Read) -> str:
    """The quantize stage's decode speed ratio on the default model (best of 3 each)."""
    m = read("metrics/quantize.json") or {}
    if m.get("quantize/decode_speed_ratio") is None:
        return missing("metrics/quantize.json")
    return (f"{m['quantize/decode_speed_ratio']:.2f}x (`quantize/decode_speed_ratio`, best of "
            "three runs each)")


@figure("int8-decode-default")
def int8_decode_default(read: Read) -> str:
    """int8 engine over float engine on the default model, batch 1, interleaved rounds."""
    return _ratio(read, "reports/decode_speed.json", "llmcore int8 / engine", "1")


@figure("w8a8-decode")
def w8a8_decode(read: Read) -> str:
    """Whole-model decode: int8 as auto runs it (w8a8 on this machine) and the weight-only
    kernel, each over the float32 engine, eager and compiled, at the 0.5B and 27M shapes."""
    parts = []
    for rel, what in (("reports/decode_speed-0.5b.json", "at the 0.5B shape"),
                      ("reports/decode_speed-27m.json", "at the 27M shape")):
        parts.append(
            f"{what}, int8 products over float32 "
            f"{_batches_1_and_8(read, rel, 'llmcore int8 / engine')} (compiled over compiled: "
            f"{_batches_1_and_8(read, rel, 'llmcore int8 compiled / engine_compiled')}), the "
            "weight-only kernel over float32 "
            f"{_batches_1_and_8(read, rel, 'llmcore int8 weight-only / engine')}")
    return "; ".join(parts)


@figure("quant-runtimes-quality")
def quant_runtimes_quality(read: Read) -> str:
    """What each runtime costs the trained default model with every layer forced into it
    (``benchmarks/quant_runtimes.py``): bpb delta and greedy agreement against float."""
    rel = "reports/quant_runtimes.json"
    data = read(rel)
    if not data or not data.get("runtimes"):
        return missing(rel)
    out = ["", "| runtime, every layer | layers in a kernel | bpb delta | greedy agreement, "
           "tokens | whole replies |", "|---|---|---|---|---|"]
    for label, row in data["runtimes"].items():
        if "skipped" in row:
            out.append(f"| {label} | not on this CPU | | | |")
            continue
        out.append(f"| {label} | {row['kernel_layers']} | {row['bpb_delta']:+.4f} | "
                   f"{row['greedy_token_agreement']:.3f} | {row['greedy_exact_agreement']:.3f} |")
    out += ["", f"({data['machine']}; `{data['model']}`, bpb {data['bpb_fp']:.4f} in float32 on "
            f"the pretraining test shards; {data['prompts']} test prompts, {data['tokens']} "
            "tokens each)", ""]
    return "\n".join(out)
