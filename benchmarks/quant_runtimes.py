"""What each quantized runtime costs a trained model: every quantizable layer forced into it.

    python benchmarks/quant_runtimes.py [--model data/models/rl] [--prompts 64]

``auto`` keeps a layer float below 2^17 weights, so on the default model (no layer that
large) the quantize stage's figures are those of expanded weights and say nothing of the
kernels' arithmetic. Here the trained model's int8 (and int4) weights run, in every layer,
in each runtime this CPU has: expanded to float32 (``dequant``: the rounding of the weights
alone), torch's weight-only int8 kernel with bf16 activations (``int8mm``), int8 products
with activations rounded to int8 per row (``w8a8``), and int4 expanded. Reported against the
float model, as the quantize stage reports: bpb on the pretraining ``test`` shards, and greedy
agreement (per token, whole replies) on the first ``--prompts`` test conversations. Writes
``reports/quant_runtimes.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.data.corpus import read_conversations  # noqa: E402
from llmcore.data.shards import ShardDataset  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, render_chat, token_bytes  # noqa: E402
from llmcore.device import cpu_kind  # noqa: E402
from llmcore.export.quantize import QuantSpec, greedy_agreement, quantize_model  # noqa: E402
from llmcore.model import qlinear  # noqa: E402
from llmcore.model.loss import heldout_loss  # noqa: E402
from llmcore.model.modeldir import load_model_dir, save_model_dir  # noqa: E402

# (label, method, runtime): the runtime forced on every quantizable layer
RUNTIMES = (("int8, expanded", "int8", "dequant"),
            ("int8 weight-only kernel, bf16 activations", "int8", "int8mm"),
            ("int8 products (w8a8)", "int8", "w8a8"),
            ("int4, expanded", "int4", "dequant"))


def kernel_layers(model: torch.nn.Module) -> int:
    kinds = (qlinear.Int8Linear, qlinear.W8A8Linear, qlinear.Int4Linear)
    return sum(isinstance(m, kinds) for m in model.modules())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "data/models/rl")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per greedy reply")
    args = ap.parse_args()
    if not (args.model / "model.safetensors").is_file():
        raise SystemExit(f"quant_runtimes: {args.model} is not a model directory: run "
                         "`dvc repro rl` (or give --model)")
    cpu = torch.device("cpu")
    fp, cfg = load_model_dir(args.model, cpu)
    tok = LLMTokenizer.load(args.model)
    tb = torch.tensor(token_bytes(tok))
    shards = ShardDataset(REPO / "data/shards", "pretrain_test")
    convs = read_conversations(REPO / "data/corpus", "test")[: args.prompts]
    prompts = [tok.encode(render_chat(c["messages"][:-1], add_generation_prompt=True))
               for c in convs]
    stops = [tok.im_end_id, tok.eot_id]
    rows = -(-len(shards) // 16)

    def bpb(m: torch.nn.Module) -> float:
        return heldout_loss(m, shards, 16, rows, tb, cpu, torch.float32)["bpb"]

    result: dict = {"machine": cpu_kind(), "torch": torch.__version__, "model": str(
        args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
        "prompts": len(prompts), "tokens": args.tokens, "bpb_fp": round(bpb(fp), 5),
        "runtimes": {}}
    print(f"float: bpb {result['bpb_fp']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, runtime in RUNTIMES:
            spec = QuantSpec(method)
            tensors, _ = quantize_model(fp, spec)
            out = Path(tmp) / method
            save_model_dir(out, cfg, tensors, args.model, {}, {}, spec.to_json())
            q, _ = load_model_dir(out, cpu, quant_runtime=runtime)
            n = kernel_layers(q)
            if runtime != "dequant" and not n:
                result["runtimes"][label] = {"skipped": f"{runtime} does not run on this CPU"}
                print(f"{label}: skipped (not on this CPU)", flush=True)
                continue
            agree = greedy_agreement(fp, q, prompts, args.tokens, stops, tok.pad_id)
            row = {"kernel_layers": n, "bpb_delta": round(bpb(q) - result["bpb_fp"], 5),
                   "greedy_token_agreement": round(agree["token"], 4),
                   "greedy_exact_agreement": round(agree["exact"], 4)}
            result["runtimes"][label] = row
            print(f"{label}: {row}", flush=True)
    dest = REPO / "reports" / "quant_runtimes.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
