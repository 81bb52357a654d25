"""DVC stage ``quantize``: weight-only int8 (or int4) copy of the SFT model, with a report."""

from __future__ import annotations

import json
import time

import torch

from llmcore.checkpoint import load_model_dir, save_model_dir
from llmcore.config import UserError
from llmcore.corpus import read_conversations
from llmcore.generate import Sampling, generate
from llmcore.quantize import QuantSpec, quantize_model, tensor_bytes
from llmcore.shards import ShardDataset
from llmcore.tokenizer import LLMTokenizer, render_chat, token_bytes
from llmcore.tracking import register_model
from llmcore.train import evaluate, pick_device
from stages._common import log, registry_bpb, repo_root, run_stage

SOURCE = "data/models/sft"


def decode_speed(model, prompt, n_tokens) -> float:
    """Tokens/s of greedy decoding at batch 1 (best of 3)."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        out = generate(model, [prompt], Sampling(max_new_tokens=n_tokens))
        best = max(best, len(out[0]) / (time.perf_counter() - start))
    return best


def body(cfgs, tracker):
    cfg, base, root = cfgs["quantize"], cfgs["base"], repo_root()
    device = pick_device(base.device)
    src = root / SOURCE
    out = root / f"data/models/sft-{cfg.method}"
    fp_model, model_cfg = load_model_dir(src, device)
    spec = QuantSpec(cfg.method, cfg.group_size)
    tensors, errors = quantize_model(fp_model, spec)
    meta = json.loads((src / "meta.json").read_text())
    meta.update(quantized_from=SOURCE, quantization=spec.to_json(), layer_errors=errors)
    save_model_dir(out, model_cfg, tensors, src, meta,
                   json.loads((src / "generation_config.json").read_text()), spec.to_json())
    q_model, _ = load_model_dir(out, device, quant_runtime=cfg.runtime)
    tok = LLMTokenizer.load(src)
    tb = torch.tensor(token_bytes(tok))
    val = ShardDataset(root / "data/shards", "pretrain_val")
    fp32 = torch.float32  # compare both models in their stored precision
    bpb_fp = evaluate(fp_model, val, 16, -(-len(val) // 16), tb, device, fp32)["bpb"]
    bpb_q = evaluate(q_model, val, 16, -(-len(val) // 16), tb, device, fp32)["bpb"]
    convs = read_conversations(root / "data/corpus", "val")[: cfg.agreement_prompts]
    if not convs:
        raise UserError("quantize: the corpus has no held-out SFT conversations to compare "
                        "the models on (enable fetch.doc_questions or fetch.synthetic_per_task)")
    prompts = [tok.encode(render_chat(c["messages"][:-1], add_generation_prompt=True))
               for c in convs]
    s = Sampling(max_new_tokens=cfg.agreement_tokens)
    stops = [tok.im_end_id, tok.eot_id]
    a = generate(fp_model, prompts, s, stops, tok.pad_id)
    b = generate(q_model, prompts, s, stops, tok.pad_id)
    same_tokens = sum(sum(x == y for x, y in zip(p, q, strict=False)) for p, q in zip(a, b,
                                                                                      strict=True))
    total_tokens = sum(max(len(p), len(q)) for p, q in zip(a, b, strict=True))
    speed_fp = decode_speed(fp_model, prompts[0], cfg.decode_tokens)
    speed_q = decode_speed(q_model, prompts[0], cfg.decode_tokens)
    fp_bytes = (src / "model.safetensors").stat().st_size
    q_bytes = (out / "model.safetensors").stat().st_size
    m = {
        "quantize/size_ratio": round(fp_bytes / q_bytes, 4),
        "quantize/fp_mb": round(fp_bytes / 2**20, 3),
        "quantize/quantized_mb": round(q_bytes / 2**20, 3),
        "quantize/quantized_tensor_mb": round(tensor_bytes(tensors) / 2**20, 3),
        "quantize/bpb_fp": round(bpb_fp, 5),
        "quantize/bpb_quantized": round(bpb_q, 5),
        "quantize/bpb_delta": round(bpb_q - bpb_fp, 5),
        "quantize/greedy_token_agreement": round(same_tokens / max(total_tokens, 1), 4),
        "quantize/greedy_exact_agreement": round(
            sum(p == q for p, q in zip(a, b, strict=True)) / len(a), 4),
        "quantize/max_layer_error": round(max(errors.values()), 6),
        "quantize/decode_tokens_per_s_fp": round(speed_fp, 1),
        "quantize/decode_tokens_per_s_quantized": round(speed_q, 1),
        "quantize/decode_speed_ratio": round(speed_q / speed_fp, 3),
    }
    m["quantize/registry_bpb"] = round(registry_bpb(out, root / "data/shards", base.device), 5)
    version = register_model(tracker, out, m["quantize/registry_bpb"], cfg.method)
    if version:
        log(f"quantize: registered as llmcore version {version}")
    log(f"quantize: {cfg.method} {m['quantize/size_ratio']:.2f}x smaller, bpb "
        f"{bpb_fp:.4f} -> {bpb_q:.4f}, agreement {m['quantize/greedy_token_agreement']:.3f}, "
        f"decode speed x{m['quantize/decode_speed_ratio']:.2f}")
    return m


def main() -> None:
    run_stage("quantize", ["base", "quantize"], body)


if __name__ == "__main__":
    main()
