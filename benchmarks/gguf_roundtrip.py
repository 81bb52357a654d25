"""The GGUF export of a trained model in a real llama.cpp, per weight type.

    python benchmarks/gguf_roundtrip.py [--model data/models/sft] [--prompts 32] [--tokens 32]

For f32, f16, q8_0 and q4_0: file size, whether llama.cpp tokenizes the held-out SFT prompts and
some awkward texts exactly as llmcore does, and greedy agreement with ``llmcore generate``
(share of prompts whose whole continuation is identical, and share of identical tokens up to
the first difference). Needs llama-cpp-python (``make llama-cpp``). Writes
reports/gguf_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.data.corpus import read_conversations  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, render_chat  # noqa: E402
from llmcore.export import llama_cpp  # noqa: E402
from llmcore.export.gguf import GGUF_TYPES, export_gguf  # noqa: E402
from llmcore.infer.generate import generate_no_cache  # noqa: E402
from llmcore.model.modeldir import load_model_dir  # noqa: E402

AWKWARD = ["12345 + 678 = 13023", "中文 日本語 🎉🙂👍🏽", "a   b\n\n\tc  \r\n d", "I'm they'd've",
           "def f(x):\n    return x**2\n"]


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/models/sft")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    ok, why = llama_cpp.available()
    if not ok:
        sys.exit(f"gguf_roundtrip: {why}")
    model_dir = REPO / args.model
    model, _ = load_model_dir(model_dir)
    tok = LLMTokenizer.load(model_dir)
    convs = read_conversations(REPO / "data" / "corpus", "val")[: args.prompts]
    prompts = [tok.encode(render_chat(c["messages"][:-1], add_generation_prompt=True))
               for c in convs]
    stops = [tok.im_end_id, tok.eot_id]
    ours = [generate_no_cache(model, p, args.tokens, stops) for p in prompts]
    texts = AWKWARD + [render_chat(c["messages"]).replace("<|im_start|>", "").replace(
        "<|im_end|>", "") for c in convs]
    result: dict = {"model": args.model, "prompts": len(prompts), "tokens": args.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for t in GGUF_TYPES:
            path = export_gguf(model_dir, Path(tmp) / f"m-{t}.gguf", t)
            llm = llama_cpp.load(path, n_ctx=model.cfg.max_seq_len)
            same_tok = sum(llama_cpp.tokenize(llm, x) == tok.encode(x) for x in texts)
            start = time.perf_counter()
            theirs = [llama_cpp.greedy(llm, p, args.tokens, stops) for p in prompts]
            seconds = time.perf_counter() - start
            n_tok = sum(len(x) for x in theirs)
            result[t] = {
                "file_mb": round(path.stat().st_size / 2**20, 3),
                "tokenization_equal": f"{same_tok}/{len(texts)}",
                "greedy_identical": round(sum(a == b for a, b in zip(ours, theirs, strict=True))
                                          / len(prompts), 4),
                "token_agreement": round(sum(prefix_match(a, b) for a, b in
                                             zip(ours, theirs, strict=True)) /
                                         max(sum(len(a) for a in ours), 1), 4),
                "llama_cpp_tokens_per_s": round(n_tok / max(seconds, 1e-9), 1),
            }
            print(t, json.dumps(result[t]), flush=True)
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports" / "gguf_roundtrip.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
