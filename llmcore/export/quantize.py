"""Weight-only quantization of a model, and what it cost.

:func:`quantize_model` turns every quantizable layer into the stored format of
:mod:`llmcore.model.quant` (int8 per output channel, or int4 group-wise, packing and
unpacking both defined there). Norms, biases and an untied embedding table stay in full
precision. A tied embedding is the LM head's matrix: it is quantized once, per token row (=
per output channel of the head); at vocab 6400 it is a third of the small models.
:func:`compare` measures what quantization cost: bits per byte, greedy agreement with the
full-precision model, and decode speed.

Trade-off: round-to-nearest with absmax scales, no calibration data (GPTQ / AWQ would lose
less at int4); it is exact to explain and needs nothing but the weights.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmcore.data.shards import ShardDataset
from llmcore.infer.generate import Sampling, generate
from llmcore.model.loss import heldout_loss
from llmcore.model.protocols import LanguageModel
from llmcore.model.quant import (
    QuantInfo,
    dequantize_int4,
    dequantize_int8,
    quantizable,
    quantize_int4,
    quantize_int8,
)

METHODS = ("int8", "int4")


@dataclass(frozen=True)
class QuantSpec:
    method: str = "int8"
    group_size: int = 64

    def to_json(self) -> QuantInfo:
        return {"method": self.method,
                "group_size": self.group_size if self.method == "int4" else None}


def quantize_model(model: nn.Module, spec: QuantSpec
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tensors for the quantized safetensors file and relative error per quantized layer.

    Quantized layers store ``<name>.qweight`` and ``<name>.scales``; every other tensor is
    stored as is (tied copies once).
    """
    if spec.method not in METHODS:
        raise ValueError(f"quantize.method must be one of {', '.join(METHODS)}")
    layers = quantizable(model)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, layer in layers.items():
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.detach().float()
        if spec.method == "int8":
            q, s = quantize_int8(w)
            back = dequantize_int8(q, s)
        else:
            q, s = quantize_int4(w, spec.group_size)
            back = dequantize_int4(q, s, spec.group_size, w.shape[1])
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q.contiguous(), s.contiguous()
        errors[name] = float((back - w).norm() / w.norm().clamp(min=1e-12))
    seen = {typing.cast(torch.Tensor, layer.weight).data_ptr() for layer in layers.values()}  # stored quantized
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, errors


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_speed(model: LanguageModel, prompt: Sequence[int], n_tokens: int) -> float:
    """Tokens/s of greedy decoding at batch 1 (best of 3: the machine is shared and noisy)."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        out = generate(model, [prompt], Sampling(max_new_tokens=n_tokens))
        best = max(best, len(out[0]) / (time.perf_counter() - start))
    return best


def greedy_agreement(a: LanguageModel, b: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: Sequence[int], pad_id: int) -> dict[str, float]:
    """How often two models' greedy replies agree: per token position, and whole replies."""
    s = Sampling(max_new_tokens=max_new_tokens)
    out_a = generate(a, prompts, s, stop_ids, pad_id)
    out_b = generate(b, prompts, s, stop_ids, pad_id)
    same = sum(sum(x == y for x, y in zip(p, q, strict=False))
               for p, q in zip(out_a, out_b, strict=True))
    total = sum(max(len(p), len(q)) for p, q in zip(out_a, out_b, strict=True))
    exact = sum(p == q for p, q in zip(out_a, out_b, strict=True))
    return {"token": same / max(total, 1), "exact": exact / max(len(prompts), 1)}


def compare(fp_model: LanguageModel, q_model: LanguageModel, val: ShardDataset, token_bytes: torch.Tensor,
            prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
            agreement_tokens: int, decode_tokens: int) -> dict[str, float]:
    """What quantization cost: bpb on ``val`` rows, greedy agreement, decode speed ratio."""
    device = next(fp_model.parameters()).device
    rows = -(-len(val) // 16)
    # both models in their stored precision: autocast would blur the difference measured
    bpb_fp = heldout_loss(fp_model, val, 16, rows, token_bytes, device, torch.float32)["bpb"]
    bpb_q = heldout_loss(q_model, val, 16, rows, token_bytes, device, torch.float32)["bpb"]
    agree = greedy_agreement(fp_model, q_model, prompts, agreement_tokens, stop_ids, pad_id)
    speed_fp = decode_speed(fp_model, prompts[0], decode_tokens)
    speed_q = decode_speed(q_model, prompts[0], decode_tokens)
    return {"bpb_fp": bpb_fp, "bpb_quantized": bpb_q, "bpb_delta": bpb_q - bpb_fp,
            "greedy_token_agreement": agree["token"], "greedy_exact_agreement": agree["exact"],
            "decode_tokens_per_s_fp": speed_fp, "decode_tokens_per_s_quantized": speed_q,
            "decode_speed_ratio": speed_q / speed_fp}
