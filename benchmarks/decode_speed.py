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


def measure(model_dir: Path, tokens: int, rounds: int, profile: bool = True) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from llmcore.export import export_hf
    from llmcore.generate import Sampling, generate
    from llmcore.modeldir import load_model_dir
    from llmcore.tokenizer import LLMTokenizer, render_chat

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

    def theirs() -> list[int]:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens,
                              pad_token_id=tok.pad_id)
        return out[0, len(prompt):].tolist()

    ours(), theirs()  # warm-up
    rates: dict[str, list[float]] = {"llmcore": [], "hf": []}
    outs = {}
    for _ in range(rounds):
        for name, fn in (("llmcore", ours), ("hf", theirs)):
            start = time.perf_counter()
            outs[name] = fn()
            rates[name].append(len(outs[name]) / (time.perf_counter() - start))
    agree = sum(a == b for a, b in zip(outs["llmcore"], outs["hf"], strict=False)) / tokens
    result = {"tokens": tokens, "prompt_tokens": len(prompt), "rounds": rounds,
              "threads": torch.get_num_threads(),
              "llmcore_tok_s": round(statistics.median(rates["llmcore"]), 1),
              "hf_tok_s": round(statistics.median(rates["hf"]), 1),
              "token_agreement": round(agree, 4), "all_rates": rates}
    result["ratio"] = round(result["llmcore_tok_s"] / result["hf_tok_s"], 3)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            start = time.perf_counter()
            ours()
            wall = time.perf_counter() - start
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        ops = sum(e.self_cpu_time_total for e in p.key_averages()) / 1e6
        result["profile"] = {"wall_s": round(wall, 4), "op_self_s": round(ops, 4),
                             "per_token_ms": round(1000 * wall / tokens, 3), "table": table}
    return result


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
    print(f"llmcore {r['llmcore_tok_s']} tok/s, transformers generate {r['hf_tok_s']} tok/s: "
          f"{r['ratio']}x (token agreement {r['token_agreement']}, {r['threads']} threads)")
    out = REPO / "reports" / f"decode_speed{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
