"""Self-describing model directories, full precision and quantized.

A model directory is Hugging Face shaped and rebuilds the model with nothing else:
``config.json`` (the :class:`ModelConfig`, plus ``quantization`` for a quantized model),
``model.safetensors``, the tokenizer files, ``generation_config.json`` and ``meta.json``
(stage, step, params, data hashes, git commit). It is written atomically.

Everything that loads a model (evaluation, the CLI, the server, export) depends on this module
(and the format module it reads with) and never on the training code or the quantizer:

* full precision: the state dict, tied weights stored once (safetensors rejects two names for
  one storage);
* quantized (written by :mod:`llmcore.export.quantize`): the format of
  :mod:`llmcore.model.quant`, ``<layer>.qweight`` and ``<layer>.scales`` per quantized layer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcore.config.model import ModelConfig
from llmcore.files import atomic_dir
from llmcore.model.quant import QuantFormatError, QuantInfo, load_quantized, tied_names
from llmcore.schema import UserError

if TYPE_CHECKING:
    from llmcore.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ModelDirError(UserError):
    """A model directory (or weights) cannot be used; the message names the file and fix."""


class GenerationConfig(TypedDict):
    """``generation_config.json`` (Hugging Face's keys): how the model ends and pads a reply."""

    eos_token_id: list[int]  # <|im_end|> and <|endoftext|>
    pad_token_id: int
    bos_token_id: int | None
    do_sample: bool
    max_new_tokens: int


def generation_config(eos_ids: list[int], pad_id: int, max_new_tokens: int = 256
                      ) -> GenerationConfig:
    """A model directory's ``generation_config.json``: greedy, ending at any of ``eos_ids``."""
    return {"eos_token_id": list(eos_ids), "pad_token_id": pad_id, "bos_token_id": None,
            "do_sample": False, "max_new_tokens": max_new_tokens}


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


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`state_dict_for_save` (tied copies may be absent)."""
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    missing = [m for m in missing if m not in tied_names(model)]
    if missing or unexpected:
        raise ModelDirError(f"weights do not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


def save_model_dir(out: Path, cfg: ModelConfig, weights: Mapping[str, torch.Tensor],
                   tokenizer_dir: Path, meta: Mapping[str, Any],
                   generation: GenerationConfig,
                   quantization: QuantInfo | None = None) -> None:
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
                   quant_runtime: str = "auto") -> tuple[Transformer, ModelConfig]:
    """Rebuild the model of a model directory, fp or quantized (on ``device``, eval mode)."""
    from llmcore.model.transformer import Transformer

    cfg = read_model_config(path)
    quant = read_config(path).get("quantization")
    model = Transformer(cfg).to(device)
    weights = read_weights(path)
    if quant:
        try:
            load_quantized(model, weights, quant, quant_runtime)
        except QuantFormatError as exc:
            raise ModelDirError(f"{path}: {exc}") from exc
    else:
        load_weights(model, weights)
    return model.eval(), cfg
