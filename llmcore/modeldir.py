"""Self-describing model directories, full precision and quantized.

A model directory is Hugging Face shaped and rebuilds the model with nothing else:
``config.json`` (the :class:`ModelConfig`, plus ``quantization`` for a quantized model),
``model.safetensors``, the tokenizer files, ``generation_config.json`` and ``meta.json``
(stage, step, params, data hashes, git commit). It is written atomically.

This module owns both weight formats, so that everything that loads a model (evaluation, the
CLI, the server, export) depends on this module alone and never on the training code or the
quantizer:

* full precision: the state dict, tied weights stored once (safetensors rejects two names for
  one storage);
* quantized (written by :mod:`llmcore.quantize`): ``<layer>.qweight`` and ``<layer>.scales``
  for each quantized layer. int8 keeps one scale per output row; int4 one per group of
  ``group_size`` input columns, two weights per byte (low nibble first). At load the weights
  are either expanded to float once (``dequant``) or kept as int8 for an int8 kernel
  (``int8mm``, the default on CUDA).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcore.config import ModelConfig, UserError
from llmcore.files import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ModelDirError(UserError):
    """A model directory (or weights) cannot be used; the message names the file and fix."""


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied weights stored once (safetensors rejects shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    return out


def _tied(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings",
                                         False) else set()


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`state_dict_for_save` (tied copies may be absent)."""
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    missing = [m for m in missing if m not in _tied(model)]
    if missing or unexpected:
        raise ModelDirError(f"weights do not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


def save_model_dir(out: Path, cfg: ModelConfig, weights: Mapping[str, torch.Tensor],
                   tokenizer_dir: Path, meta: Mapping[str, Any],
                   generation: Mapping[str, Any],
                   quantization: Mapping[str, Any] | None = None) -> None:
    """Write a model directory atomically (the previous one stays until the new is whole)."""

    def fill(tmp: Path) -> None:
        config = {"architectures": ["LLMCoreForCausalLM"], "model_type": "llmcore",
                  **dataclasses.asdict(cfg), "torch_dtype": "float32"}
        if quantization:
            config["quantization"] = dict(quantization)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        (tmp / "generation_config.json").write_text(json.dumps(dict(generation), indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")

    atomic_dir(Path(out), fill)


def read_config(path: Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model directory, or a :class:`ModelDirError`."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{path} is not a model directory (no config.json): pass one that "
                            "a stage wrote, e.g. data/models/sft, or run `dvc repro`")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_path} is not valid JSON ({exc}); re-run the stage that "
                            "wrote it") from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{config_path} must hold a JSON object")
    return raw


def read_model_config(path: Path) -> ModelConfig:
    raw = read_config(path)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in fields})
    except TypeError as exc:
        raise ModelDirError(f"{Path(path) / 'config.json'} is not an llmcore model config "
                            f"({exc})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "model.safetensors"
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelDirError(f"{file} is unreadable ({exc}); re-run the stage that wrote "
                            "it") from None


def load_model_dir(path: Path, device: str | torch.device = "cpu",
                   quant_runtime: str = "auto") -> tuple[Any, ModelConfig]:
    """Rebuild the model of a model directory, fp or quantized (on ``device``, eval mode)."""
    from llmcore.model import Transformer

    cfg = read_model_config(path)
    quant = read_config(path).get("quantization")
    model = Transformer(cfg).to(device)
    weights = read_weights(path)
    if quant:
        load_quantized(model, weights, quant, quant_runtime)
    else:
        load_weights(model, weights)
    return model.eval(), cfg


# --------------------------------------------------------------------------------------------
# The quantized format
# --------------------------------------------------------------------------------------------


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weight is quantized: every Linear, and a token embedding tied to the head.

    A tied matrix is the LM head's weight, so it is quantized once, per output channel of
    the head (= per token row of the embedding), and loads back as one shared matrix.
    """
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    tied_id = None
    if isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) \
            and head.weight is embed.weight:
        tied_id = id(head.weight)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        linear = isinstance(m, nn.Linear) and id(m.weight) != tied_id
        if linear or (isinstance(m, nn.Embedding) and id(m.weight) == tied_id):
            out[name] = m
    return out


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    in_features: int | None = None) -> torch.Tensor:
    """packed uint8 (out, padded/2), scales (out, groups) -> float (out, in_features)."""
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).float()  # (out, padded)
    out_f, padded = q.shape
    w = (q.reshape(out_f, padded // group_size, group_size) * scale[..., None]).reshape(out_f,
                                                                                        padded)
    return w if in_features is None else w[:, :in_features]


class Int8Linear(nn.Module):
    """A Linear whose int8 weights stay int8; the product runs in ``_weight_int8pack_mm``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype),
                                      self.qweight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8mm_available(device: torch.device) -> bool:
    try:
        x = torch.randn(2, 32, device=device)
        q = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, q, torch.ones(8, device=device))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def load_quantized(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                   quant: Mapping[str, Any], mode: str = "auto") -> nn.Module:
    """Fill ``model`` (built from the config) from quantized tensors.

    ``mode``: ``dequant`` expands weights to float at load; ``int8mm`` keeps int8 weights
    (int8 method only); ``auto`` picks int8mm on CUDA and dequant elsewhere (on CPUs torch's
    int8 kernel was measured slower than a float matrix-vector product at batch 1).
    """
    method, group = quant.get("method"), quant.get("group_size")
    if method not in ("int8", "int4"):
        raise ModelDirError(f"config.json: unknown quantization method {method!r}")
    device = next(model.parameters()).device
    if mode == "auto":
        mode = "int8mm" if device.type == "cuda" and method == "int8" else "dequant"
    if mode == "int8mm" and (method != "int8" or not int8mm_available(device)):
        mode = "dequant"
    plain = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales"))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    layers = quantizable(model)
    expected = {f"{n}.weight" for n in layers}
    bad = [m for m in missing if m not in expected and m not in _tied(model)]
    absent = [n for n in layers if f"{n}.qweight" not in tensors or f"{n}.scales" not in tensors]
    if bad or unexpected or absent:
        raise ModelDirError(f"quantized weights do not match the model: missing "
                            f"{(bad + absent)[:5]}, unexpected {unexpected[:5]}")
    for name, layer in layers.items():
        q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        if mode == "int8mm" and isinstance(layer, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear(q.to(device), s.to(device), layer.bias))
            continue
        w = (dequantize_int8(q, s) if method == "int8"
             else dequantize_int4(q, s, group, layer.weight.shape[1]))
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
    return model
