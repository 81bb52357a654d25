"""Greedy decode speed, batch 1 and batch 8: llmcore against transformers and llama.cpp.

    python benchmarks/decode_speed.py [--model data/models/sft] [--tokens 128] [--rounds 5]
    python benchmarks/decode_speed.py --tree /path/to/other/checkout --label before
    python benchmarks/decode_speed.py --batches 1 --no-llama-cpp --no-profile   # quick

Sides, all on the same weights at float32 unless named otherwise, each producing exactly
``--tokens`` new tokens per sequence (no early stop):

* ``generate``: :func:`llmcore.infer.generate.generate` (what ``llmcore generate`` and the
  evaluation run); a batch is left-padded. It runs on the same model object as the engines,
  so on the model the engine prepared for inference (as ``llmcore generate`` prepares it).
* ``engine`` / ``engine_compiled``: the continuous-batching engine that ``llmcore serve``
  runs, eager and with ``--compile``, driven from this (the main) thread as the server does.
* ``transformers``: ``LlamaForCausalLM.generate`` on the Hugging Face export.
* ``llama.cpp f32`` / ``llama.cpp f16``: the GGUF export (``llmcore export --format gguf``)
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


def build_sides(model_dir: Path, tokens: int, llama: bool, tmp: Path
                ) -> tuple[dict[str, Callable[[list[list[int]]], list[list[int]]]],
                           list[list[int]], dict[str, str]]:
    """name -> f(prompts) -> new tokens per prompt; the prompts; sides skipped and why."""
    import torch
    from transformers import LlamaForCausalLM

    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.export.hf import export_hf
    from llmcore.infer.engine import Engine
    from llmcore.infer.generate import Sampling, generate
    from llmcore.model.modeldir import load_model_dir

    model, _ = load_model_dir(model_dir, torch.device("cpu"))
    model = model.float().eval()
    tok = LLMTokenizer.load(model_dir)
    prompts = [tok.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    export_hf(model_dir, tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly `tokens` steps, like the others

    def transformers_side(ps: list[list[int]]) -> list[list[int]]:
        width = max(map(len, ps))
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                              pad_token_id=tok.pad_id)
        return out[:, width:].tolist()

    sides: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        "generate": lambda ps: generate(model, ps, Sampling(max_new_tokens=tokens))}
    for name, compiled in (("engine", False), ("engine_compiled", True)):
        eng = Engine(model, tok, max_batch=len(QUESTIONS), own_thread=False, compile=compiled)
        eng.warm_up()
        sides[name] = lambda ps, eng=eng: _engine_run(eng, ps, tokens)
    sides["transformers"] = transformers_side
    skipped: dict[str, str] = {}
    if llama:
        from llmcore.export.gguf import export_gguf
        from llmcore.export.llama_cpp import available

        ok, why = available()
        for kind in ("f32", "f16"):
            if not ok:
                skipped[f"llama.cpp {kind}"] = why
                continue
            gguf = export_gguf(model_dir, tmp / f"model-{kind}.gguf", kind)
            runner = LlamaCpp(gguf, len(QUESTIONS), max(map(len, prompts)) + tokens + 1,
                              torch.get_num_threads())
            sides[f"llama.cpp {kind}"] = lambda ps, r=runner: r.greedy(ps, tokens)
    return sides, prompts, skipped


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sides chose the same token."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(map(len, a))


def measure(model_dir: Path, tokens: int, rounds: int, batches: Sequence[int],
            llama: bool = True, profile: bool = True) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        sides, prompts, skipped = build_sides(model_dir, tokens, llama, Path(tmp))
        result: dict[str, Any] = {"tokens": tokens, "rounds": rounds, "skipped": skipped,
                                  "threads": torch.get_num_threads(), "batches": {}}
        for batch in batches:
            ps = prompts[:batch]
            outs = {name: fn(ps) for name, fn in sides.items()}  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(rounds):
                for name, fn in sides.items():
                    start = time.perf_counter()
                    outs[name] = fn(ps)
                    rates[name].append(batch * tokens / (time.perf_counter() - start))
            result["batches"][str(batch)] = {
                "tok_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                "agreement_with_generate": {k: round(_agreement(outs["generate"], v), 4)
                                            for k, v in outs.items() if k != "generate"},
                "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
        if profile:
            result["profile"] = _profile(lambda: sides["engine"](prompts[:1]), tokens)
    return result


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
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], choices=range(1, 9))
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--no-profile", action="store_true", help="no torch.profiler table")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose llmcore to time")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from llmcore.device import cpu_kind

    r = measure(args.model.resolve(), args.tokens, args.rounds, args.batches,
                llama=not args.no_llama_cpp, profile=not args.no_profile)
    r["machine"] = cpu_kind()
    print(r.get("profile", {}).get("table", ""))
    for batch, b in r["batches"].items():
        print(f"batch {batch}: new tokens per second (median of {args.rounds}), "
              f"agreement with generate")
        for name, rate in b["tok_s"].items():
            agree = b["agreement_with_generate"].get(name)
            print(f"  {name:>16} {rate:>8.1f}" + (f"   {agree:.3f}" if agree is not None else ""))
    for name, why in r["skipped"].items():
        print(f"  {name}: skipped, {why}")
    print(f"{r['threads']} threads, {r['machine']}")
    out = REPO / "reports" / f"decode_speed{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
