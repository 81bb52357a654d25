"""DVC stage ``quantize``: weight-only int8 (or int4) copy of the chain's last model (``rl``,
which is the DPO or SFT model when those stages are skipped), with a report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from llmcore.config.base import BaseConfig
from llmcore.config.quantize import QuantizeConfig
from llmcore.data.corpus import read_conversations
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, render_chat, token_bytes
from llmcore.device import pick_device
from llmcore.eval.evaluate import split_bpb
from llmcore.export.gguf import export_gguf
from llmcore.export.hf import llama_compatible
from llmcore.export.quantize import QuantSpec, compare, quantize_model, tensor_bytes
from llmcore.model.modeldir import load_model_dir, save_model_dir
from llmcore.schema import UserError
from llmcore.tracking import Tracker, register_model
from stages import chain, paths
from stages._common import StageParams, log, model_tags, repo_root, run_stage

STAGE = "quantize"
SHARDS = paths.SHARDS


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    quantize: QuantizeConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, root = p.quantize, repo_root()
    device = pick_device(p.base.device)
    source = chain.source("quantize", root)  # the model the chain ships (dvc.yaml)
    src, out = root / source, root / paths.model_dir(f"chat-{cfg.method}")
    fp_model, model_cfg = load_model_dir(src, device)
    # what quantization cost is reported on test, like every reported figure; a corpus too
    # small to have a test split falls back to val (said in the log and in the metrics)
    split = "test" if len(ShardDataset(root / SHARDS, "pretrain_test")) and \
        read_conversations(root / paths.CORPUS, "test") else "val"
    if split == "val":
        log("quantize: the corpus has no test documents or conversations: the report is on val")
    convs = read_conversations(root / paths.CORPUS, split)[: cfg.agreement_prompts]
    if not convs:
        raise UserError("quantize: the corpus has no held-out SFT conversations to compare "
                        "the models on (enable fetch.doc_questions or fetch.synthetic_per_task)")
    spec = QuantSpec(cfg.method, cfg.group_size)
    tensors, errors = quantize_model(fp_model, spec)
    meta = json.loads((src / "meta.json").read_text())
    meta.update(quantized_from=source, quantization=spec.to_json(), layer_errors=errors)
    save_model_dir(out, model_cfg, tensors, src, meta,
                   json.loads((src / "generation_config.json").read_text()), spec.to_json())
    q_model, _ = load_model_dir(out, device, quant_runtime=cfg.runtime)
    tok = LLMTokenizer.load(src)
    tb = torch.tensor(token_bytes(tok))
    prompts = [tok.encode(render_chat(c["messages"][:-1], add_generation_prompt=True))
               for c in convs]
    report = compare(fp_model, q_model, ShardDataset(root / SHARDS, f"pretrain_{split}"), tb, prompts,
                     [tok.im_end_id, tok.eot_id], tok.pad_id, cfg.agreement_tokens,
                     cfg.decode_tokens)
    fp_bytes = (src / "model.safetensors").stat().st_size
    q_bytes = (out / "model.safetensors").stat().st_size
    m: dict[str, Any] = {f"quantize/{k}": round(v, 5) for k, v in report.items()}
    m["quantize/report_split"] = split
    m.update({
        "quantize/size_ratio": round(fp_bytes / q_bytes, 4),
        "quantize/fp_mb": round(fp_bytes / 2**20, 3),
        "quantize/quantized_mb": round(q_bytes / 2**20, 3),
        "quantize/quantized_tensor_mb": round(tensor_bytes(tensors) / 2**20, 3),
        "quantize/max_layer_error": round(max(errors.values()), 6),
        "quantize/registry_bpb": round(split_bpb(q_model, ShardDataset(root / SHARDS, "sft_val"),
                                                 tb), 5),
    })
    cannot = llama_compatible(model_cfg)
    if cfg.gguf and cannot:  # a non-Llama experiment still gets its int8 model
        log(f"quantize: no GGUF written, llama.cpp's llama architecture needs rope, rmsnorm, "
            f"swiglu and no biases: {'; '.join(cannot)} (quantize.gguf: null silences this)")
    elif cfg.gguf:
        gguf_path = export_gguf(src, out / "model.gguf", cfg.gguf)
        m["quantize/gguf_mb"] = round(gguf_path.stat().st_size / 2**20, 3)
        log(f"quantize: wrote {gguf_path.relative_to(root)} ({cfg.gguf})")
    registered = register_model(tracker, out, m["quantize/registry_bpb"], cfg.method,
                                tags=model_tags(root, "quantize", p.sections()))
    if registered:
        log(f"quantize: {registered.message}")
    log(f"quantize: {cfg.method} {m['quantize/size_ratio']:.2f}x smaller, bpb "
        f"{report['bpb_fp']:.4f} -> {report['bpb_quantized']:.4f}, agreement "
        f"{report['greedy_token_agreement']:.3f}, decode speed "
        f"x{report['decode_speed_ratio']:.2f}")
    return m


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
