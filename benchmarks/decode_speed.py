"""Greedy decode speed at batches up to 32: llmcore (float, int8, int4) against transformers and
llama.cpp (f32, f16, q8_0, q4_0), on a trained model or on random weights of any shape.

    python benchmarks/decode_speed.py [--model data/models/sft] [--tokens 128] [--rounds 5]
    python benchmarks/decode_speed.py --preset llama-0.5b --tokens 32 --rounds 3 --label 0.5b
    python benchmarks/decode_speed.py --shape 8x512 --batches 1 8 32 --label 27m
    python benchmarks/decode_speed.py --tree /path/to/other/checkout --label before
    python benchmarks/decode_speed.py --batches 1 --sides engine "llmcore int8" --no-profile

``--preset NAME`` (a ``model.preset``) or ``--shape LxD`` (L layers of width D, heads of 64,
the preset ``cpu-mini``'s other fields) builds a model directory of random weights with the
project's tokenizer (``data/tokenizer``, vocabulary 4096): speed only, the replies are noise.

Sides, all on the same weights at float32 unless named otherwise, each producing exactly
``--tokens`` new tokens per sequence (no early stop):

* ``generate``: :func:`llmcore.infer.generate.generate` (what ``llmcore generate`` and the
  evaluation run); a batch is left-padded. It runs on the same model object as the engines,
  so on the model the engine prepared for inference (as ``llmcore generate`` prepares it).
* ``engine`` / ``engine_compiled``: the continuous-batching engine that ``llmcore serve``
  runs, eager and with ``--compile``, driven from this (the main) thread as the server does.
* ``llmcore int8``: the same engine on the model quantized to int8 (``llmcore.export.quantize``,
  what the quantize stage writes), loaded with the runtime ``auto`` picks on this machine
  (``llmcore.model.qlinear.int8_runtime``), as ``llmcore serve`` loads a quantized directory.
* ``llmcore int8 weight-only``: the same int8 directory under ``quantize.runtime: int8mm``
  (torch's weight-only kernel, float activations), for what ``auto``'s ``w8a8`` (int8
  activations too, where the CPU has int8 dot products) adds over it.
* ``llmcore int4``: the same with int4 weights in groups of 64 (``quantize.method: int4``):
  torch's int4 kernel in the layers where it pays on this CPU, the others expanded to float32.
* ``llmcore int8 compiled`` / ``llmcore int4 compiled``: those engines with ``--compile``
  (compared with ``engine_compiled``: both sides without the per-op dispatch).
* ``transformers``: ``LlamaForCausalLM.generate`` on the Hugging Face export.
* ``llama.cpp f32`` / ``f16`` / ``q8_0`` / ``q4_0``: the GGUF export (``llmcore export --format gguf``)
  in llama.cpp through llama-cpp-python's low-level API: one context holding 8 sequences,
  every step one ``llama_decode`` of one token per sequence and an argmax of its logits, which
  is what llama.cpp's own server does; skipped, with the reason, when llama-cpp-python is not
  installed (``make llama-cpp``).

Every round runs each side once, in turn, so that a noisy machine slows them alike; the median
rate (new tokens per second over the whole batch) is reported, with each side's agreement with
``generate``'s tokens (same work, same answer). Then a ``torch.profiler`` table of the engine's
batch-1 decode: where a step's time goes. Writes reports/decode_speed[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Explain what a Python list is and how to use it.", "What is 12 + 7?",
             "How do I open a file in Python?", "Spell the word river.",
             "What does a dictionary do?", "Count the letters in the word apple.",
             "Reverse the letters of the word stack.", "What is a for loop?"]


class LlamaCpp:
    """Batched greedy decoding in llama.cpp: one context, one KV sequence per prompt."""

    def __init__(self, gguf: Path, max_batch: int, ctx_per_seq: int, threads: int) -> None:
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(False)
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(),
                                                  L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = ctx_per_seq * max_batch
        params.n_batch = params.n_ubatch = ctx_per_seq * max_batch  # a prefill in one decode
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(params.n_batch, 0, 1)

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens = i + 1

    def _decode_argmax(self, rows: Sequence[int]) -> list[int]:
        import numpy as np

        if self.L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, r),
                                                   shape=(self.n_vocab,)))) for r in rows]

    def greedy(self, prompts: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.batch.n_tokens, rows = 0, []
        for s, p in enumerate(prompts):
            for j, t in enumerate(p):
                self._add(t, j, s, j == len(p) - 1)
            rows.append(self.batch.n_tokens - 1)
        out = [[t] for t in self._decode_argmax(rows)]
        for step in range(1, tokens):
            self.batch.n_tokens = 0
            for s, p in enumerate(prompts):
                self._add(out[s][-1], len(p) + step - 1, s, True)
            for s, t in enumerate(self._decode_argmax(range(len(prompts)))):
                out[s].append(t)
        return out


def _engine_run(engine: Any, prompts: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """Greedy requests through the engine, all submitted at once, run to completion here."""
    from llmcore.infer.engine import Request
    from llmcore.infer.generate import Sampling

    done: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.submit(Request(p, Sampling(max_new_tokens=tokens),
                              lambda e, i=i: done.__setitem__(i, e.ids) if e.finish else None))
    engine.run(until_idle=True)
    return [done[i] for i in range(len(prompts))]


SIDES = ("generate", "engine", "engine_compiled", "llmcore int8", "llmcore int8 compiled",
         "llmcore int8 weight-only", "llmcore int4", "llmcore int4 compiled", "transformers",
         "llama.cpp f32", "llama.cpp f16", "llama.cpp q8_0", "llama.cpp q4_0")


def random_model_dir(out: Path, preset: str, shape: str | None,
                     tok_dir: Path = REPO / "data" / "tokenizer") -> Path:
    """A model directory of random weights: ``preset``'s config, or ``shape`` (``LxD``: L
    layers of width D, heads of 64) on cpu-mini's other fields; the project's tokenizer."""
    import torch

    from llmcore.config.model import parse_model
    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.model.modeldir import generation_config, save_model_dir, state_dict_for_save
    from llmcore.model.transformer import Transformer
    from llmcore.schema import ConfigError

    if not (tok_dir / "tokenizer.json").is_file():
        raise SystemExit(f"decode_speed: {tok_dir} is missing: run `dvc repro tokenizer`")
    tok = LLMTokenizer.load(tok_dir)
    raw: dict[str, Any] = {"preset": preset, "vocab_size": tok.vocab_size}
    if shape:
        m = re.fullmatch(r"(\d+)x(\d+)", shape.lower())
        if not m or int(m[1]) < 1 or int(m[2]) < 64 or int(m[2]) % 64:
            raise SystemExit(f"decode_speed: --shape {shape!r}: give LxD, L layers of width D, "
                             "D a multiple of 64 (heads of 64), e.g. 8x512")
        heads = int(m[2]) // 64
        raw.update(n_layers=int(m[1]), d_model=int(m[2]), n_heads=heads, n_kv_heads=heads)
    try:
        cfg = parse_model(raw)
    except ConfigError as e:
        raise SystemExit(f"decode_speed: --preset {preset!r}: {e}") from e
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_model_dir(out, cfg, state_dict_for_save(model), tok_dir, {"random_weights": True},
                   generation_config([tok.im_end_id, tok.eot_id], tok.pad_id))
    return out


def build_sides(model_dir: Path, tokens: int, wanted: Sequence[str], max_batch: int, tmp: Path
                ) -> tuple[dict[str, Callable[[list[list[int]]], list[list[int]]]],
                           list[list[int]], dict[str, str]]:
    """name -> f(prompts) -> new tokens per prompt; the prompts (``max_batch`` of them, the
    questions repeated); sides skipped and why."""
    import torch

    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.export.quantize import QuantSpec, quantize_model
    from llmcore.infer.engine import Engine
    from llmcore.infer.generate import Sampling, generate
    from llmcore.model.modeldir import load_model_dir, save_model_dir

    model, cfg = load_model_dir(model_dir, torch.device("cpu"))
    model = model.float().eval()
    tok = LLMTokenizer.load(model_dir)
    prompts = [tok.encode_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(max_batch)]
    sides: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {}
    skipped: dict[str, str] = {}
    if "generate" in wanted:
        sides["generate"] = lambda ps: generate(model, ps, Sampling(max_new_tokens=tokens))

    def engine_side(m: Any, compiled: bool) -> Callable[[list[list[int]]], list[list[int]]]:
        eng = Engine(m, tok, max_batch=max_batch, own_thread=False, compile=compiled)
        eng.warm_up()
        return lambda ps: _engine_run(eng, ps, tokens)

    for name, compiled in (("engine", False), ("engine_compiled", True)):
        if name in wanted:
            sides[name] = engine_side(model, compiled)
    for method in ("int8", "int4"):  # as the quantize stage writes them, as serve loads them
        names = [n for n in (f"llmcore {method}", f"llmcore {method} compiled",
                             f"llmcore {method} weight-only") if n in wanted]
        if names:
            spec = QuantSpec(method)
            tensors, _ = quantize_model(model, spec)
            save_model_dir(tmp / method, cfg, tensors, model_dir, {}, json.loads(
                (model_dir / "generation_config.json").read_text()), spec.to_json())
            q_model, _ = load_model_dir(tmp / method, torch.device("cpu"))
            for name in names:  # (serve --compile on a quantized directory)
                m = (load_model_dir(tmp / method, torch.device("cpu"), quant_runtime="int8mm")[0]
                     if name.endswith("weight-only") else q_model)
                sides[name] = engine_side(m.eval(), name.endswith("compiled"))
    if "transformers" in wanted:
        sides["transformers"] = _transformers_side(model_dir, tok, tokens, tmp)
    kinds = [k for k in ("f32", "f16", "q8_0", "q4_0") if f"llama.cpp {k}" in wanted]
    if kinds:
        from llmcore.export.gguf import export_gguf
        from llmcore.export.llama_cpp import available

        ok, why = available()
        for kind in kinds:
            if not ok:
                skipped[f"llama.cpp {kind}"] = why
                continue
            gguf = export_gguf(model_dir, tmp / f"model-{kind}.gguf", kind)
            runner = LlamaCpp(gguf, max_batch, max(map(len, prompts)) + tokens + 1,
                              torch.get_num_threads())
            sides[f"llama.cpp {kind}"] = lambda ps, r=runner: r.greedy(ps, tokens)
    return sides, prompts, skipped


def _transformers_side(model_dir: Path, tok: Any, tokens: int, tmp: Path
                       ) -> Callable[[list[list[int]]], list[list[int]]]:
    """``LlamaForCausalLM.generate`` on the Hugging Face export, left-padded, no early stop."""
    import torch
    from transformers import LlamaForCausalLM

    from llmcore.export.hf import export_hf

    export_hf(model_dir, tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly `tokens` steps, like the others

    def run(ps: list[list[int]]) -> list[list[int]]:
        width = max(map(len, ps))
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                              pad_token_id=tok.pad_id)
        return out[:, width:].tolist()

    return run


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sides chose the same token."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(map(len, a))


def measure(model_dir: Path, tokens: int, rounds: int, batches: Sequence[int],
            wanted: Sequence[str] = SIDES, profile: bool = True) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        sides, prompts, skipped = build_sides(model_dir, tokens, wanted, max(batches), Path(tmp))
        result: dict[str, Any] = {"tokens": tokens, "rounds": rounds, "skipped": skipped,
                                  "threads": torch.get_num_threads(), "batches": {}}
        reference = next(iter(sides))  # the first side: generate, unless left out
        for batch in batches:
            ps = prompts[:batch]
            outs = {name: fn(ps) for name, fn in sides.items()}  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in sides}
            for r in range(rounds):
                for name, fn in sides.items():
                    start = time.perf_counter()
                    outs[name] = fn(ps)
                    rates[name].append(batch * tokens / (time.perf_counter() - start))
                print(f"batch {batch} round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {v[-1]:,.0f}" for n, v in rates.items()), flush=True)
            result["batches"][str(batch)] = {
                "tok_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                "agreement_with": reference,
                "agreement_with_generate": {k: round(_agreement(outs[reference], v), 4)
                                            for k, v in outs.items() if k != reference},
                "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
                "ratios": _ratios(rates)}
        if profile and "engine" in sides:
            result["profile"] = _profile(lambda: sides["engine"](prompts[:1]), tokens)
    return result


# side over side, round by round (each round ran both, one after the other): what the targets
# of the quantized runtime and the compiled engine are read on
RATIOS = (("llmcore int8", "engine"), ("llmcore int8", "llama.cpp q8_0"),
          ("llmcore int8 weight-only", "engine"), ("llmcore int8", "llmcore int8 weight-only"),
          ("llmcore int4", "engine"), ("llmcore int4", "llmcore int8"),
          ("llmcore int4", "llama.cpp q4_0"),
          ("llmcore int8 compiled", "engine_compiled"), ("llmcore int4 compiled", "engine_compiled"),
          ("llmcore int8 compiled", "llama.cpp q8_0"), ("llmcore int4 compiled", "llama.cpp q4_0"),
          ("engine_compiled", "llama.cpp f32"), ("engine", "llama.cpp f32"))


def _ratios(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Per pair of :data:`RATIOS` both timed: the per-round rate ratios, their mean and the
    95% t interval of the mean."""
    from llmcore.report.compare import describe

    out = {}
    for a, b in RATIOS:
        if a in rates and b in rates:
            r = describe([x / y for x, y in zip(rates[a], rates[b], strict=True)])
            out[f"{a} / {b}"] = {"mean": r["mean"], "ci95": r["ci95"], "n": r["n"]}
    return out


def _profile(run: Callable[[], Any], tokens: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    averages = p.key_averages()
    return {"wall_s": round(wall, 4), "per_token_ms": round(1000 * wall / tokens, 3),
            "ops_per_token": round(sum(e.count for e in averages) / tokens, 1),
            "table": averages.table(sort_by="self_cpu_time_total", row_limit=14)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "data/models/sft")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", help="random weights of this model.preset (speed only)")
    ap.add_argument("--shape", help="random weights of LxD: L layers of width D, heads of 64")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], choices=range(1, 33),
                    metavar="1..32")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, metavar="SIDE",
                    help=f"the sides to time (default all: {', '.join(SIDES)})")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--no-profile", action="store_true", help="no torch.profiler table")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose llmcore to time")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from llmcore.device import cpu_kind

    wanted = [w for w in args.sides if not (args.no_llama_cpp and w.startswith("llama.cpp"))]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model.resolve()
        if args.preset or args.shape:
            model_dir = random_model_dir(Path(tmp) / "model", args.preset or "cpu-mini",
                                         args.shape)
        r = measure(model_dir, args.tokens, args.rounds, args.batches, wanted,
                    profile=not args.no_profile)
        cfg = json.loads((model_dir / "config.json").read_text())
    r["machine"] = cpu_kind()
    r["model"] = {"source": (f"random weights, preset {args.preset or 'cpu-mini'}"
                             + (f", shape {args.shape}" if args.shape else "")
                             if args.preset or args.shape else str(args.model)),
                  **{k: cfg[k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff",
                                         "vocab_size")}}
    out = REPO / "reports" / f"decode_speed{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")  # first: a printing slip loses nothing
    print(r.get("profile", {}).get("table", ""))
    for batch, b in r["batches"].items():
        print(f"batch {batch}: new tokens per second (median of {args.rounds}), "
              f"agreement with {b['agreement_with']}")
        for name, rate in b["tok_s"].items():
            agree = b["agreement_with_generate"].get(name)
            print(f"  {name:>16} {rate:>8.1f}" + (f"   {agree:.3f}" if agree is not None else ""))
        for pair, ratio in b["ratios"].items():
            lo, hi = ratio["ci95"]
            print(f"  {pair}: {ratio['mean']:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if lo else ""))
    for name, why in r["skipped"].items():
        print(f"  {name}: skipped, {why}")
    print(f"{r['threads']} threads, {r['machine']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
