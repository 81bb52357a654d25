"""Single-stream greedy decode speed: llmcore's KV-cache loop against Hugging Face ``generate``.

    python benchmarks/decode_speed.py [--model data/models/sft] [--tokens 128] [--rounds 5]
    python benchmarks/decode_speed.py --tree /path/to/other/checkout --label before

Same weights (the model exported with ``llmcore export``, loaded as ``LlamaForCausalLM``), fp32,
batch 1, the same prompt, exactly ``--tokens`` new tokens on both sides (no early stop),
measured in alternating rounds so that machine noise hits both alike; the median of each side
is reported, with the tokens agreement between the two outputs (same work, same answer). Then a
``torch.profiler`` table of llmcore's decode: where a step's time goes. Writes
reports/decode_speed[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model_dir: Path, tokens: int, rounds: int, profile: bool = True,
            engine: bool = True) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from llmcore.data.tokenizer import LLMTokenizer, render_chat
    from llmcore.export.hf import export_hf
    from llmcore.infer.generate import Sampling, generate
    from llmcore.model.modeldir import load_model_dir

    torch.manual_seed(0)
    model, cfg = load_model_dir(model_dir, torch.device("cpu"))
    model = model.float().eval()
    tok = LLMTokenizer.load(model_dir)
    prompt = tok.encode(render_chat([{"role": "user", "content": "Explain what a Python list "
                                      "is and how to use it."}], add_generation_prompt=True))
    tokens = min(tokens, cfg.max_seq_len - len(prompt))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model_dir, Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def ours() -> list[int]:
        return generate(model, [prompt], Sampling(max_new_tokens=tokens))[0]

    hf.generation_config.eos_token_id = None  # run exactly `tokens` steps, like ours

    def theirs() -> list[int]:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=tokens, pad_token_id=tok.pad_id)
        return out[0, len(prompt):].tolist()

    sides = {"llmcore": ours, "hf": theirs}
    if engine:  # the server's decode path, in this (the main) thread, as `llmcore serve` runs
        from llmcore.infer.engine import Engine

        for name, compiled in (("engine", False), ("engine_compiled", True)):
            eng = Engine(model, tok, max_batch=8, own_thread=False, compile=compiled)
            eng.warm_up()
            sides[name] = lambda eng=eng: _engine_run(eng, prompt, tokens)
    for fn in sides.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    outs = {}
    for _ in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            outs[name] = fn()
            rates[name].append(len(outs[name]) / (time.perf_counter() - start))
    agree = sum(a == b for a, b in zip(outs["llmcore"], outs["hf"], strict=False)) / tokens
    result = {"tokens": tokens, "prompt_tokens": len(prompt), "rounds": rounds,
              "threads": torch.get_num_threads(), "token_agreement": round(agree, 4),
              "tok_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
              "all_rates": rates}
    result["ratio_vs_hf"] = {k: round(v / result["tok_s"]["hf"], 3)
                             for k, v in result["tok_s"].items() if k != "hf"}
    if engine:
        result["engine_equals_generate"] = outs["engine"] == outs["llmcore"] == outs[
            "engine_compiled"]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            start = time.perf_counter()
            ours()
            wall = time.perf_counter() - start
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        ops = sum(e.self_cpu_time_total for e in p.key_averages()) / 1e6
        result["profile"] = {"wall_s": round(wall, 4), "op_self_s": round(ops, 4),
                             "per_token_ms": round(1000 * wall / tokens, 3), "table": table}
    return result


def _engine_run(engine, prompt: list[int], tokens: int) -> list[int]:
    """One greedy request through the engine, run to completion in this thread."""
    from llmcore.infer.engine import Request
    from llmcore.infer.generate import Sampling

    done: list = []
    engine.submit(Request(prompt, Sampling(max_new_tokens=tokens),
                          lambda e: done.append(e) if e.finish else None))
    engine.run(until_idle=True)
    return done[0].ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "data/models/sft")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose llmcore to time")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    r = measure(args.model.resolve(), args.tokens, args.rounds)
    print(r.get("profile", {}).get("table", ""))
    for name, rate in r["tok_s"].items():
        ratio = r["ratio_vs_hf"].get(name)
        print(f"{name:>16} {rate:>8.1f} tok/s" + (f"  {ratio:.2f}x transformers generate"
                                                   if ratio else ""))
    print(f"token agreement llmcore vs transformers {r['token_agreement']}, "
          f"{r['threads']} threads")
    out = REPO / "reports" / f"decode_speed{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
