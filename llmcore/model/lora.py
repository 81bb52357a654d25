"""LoRA: fine-tune a few low-rank matrices beside frozen weights.

For a frozen ``Linear`` with weight W (out, in), LoRA learns A (rank, in) and B (out, rank) and
computes ``y = x W^T + (alpha / rank) * dropout(x) A^T B^T``. B starts at zero, so training
starts exactly at the base model; A starts random (Kaiming-uniform, as in the paper and PEFT)
so that B's gradient is not zero. Only A and B are trained: rank 8 on the attention and MLP
matrices of the default model is a few percent of its parameters.

After training, ``merge_state_dict`` folds ``W + (alpha / rank) B A`` into plain weights, so
the exported model is an ordinary model directory (same size and speed as the base);
``save_adapter`` writes the adapters alone in PEFT's layout (``adapter_model.safetensors`` +
``adapter_config.json``, keys named as in the Hugging Face export), so ``peft.PeftModel`` can
load them onto ``llmcore export``'s directory, and ``load_adapter`` puts them back onto a base
model directory here.

Module names of the targets: q, k, v, o (attention projections) and gate, up, down (MLP).
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from llmcore.config.lora import LoRAConfig

TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRAParams(TypedDict):
    """What of a :class:`LoRASpec` shapes a run (:meth:`LoRASpec.fingerprint`)."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg: LoRAConfig) -> LoRASpec:
        """From the ``sft.lora`` params section."""
        return cls(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                   targets=tuple(cfg.targets))

    # what the training loop calls (llmcore.train.fit.FitSpec.adapter)
    def apply(self, model: nn.Module) -> list[str]:
        return apply_lora(model, self)

    def export(self, state: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(merged plain weights, the adapters) of a LoRA model's state dict."""
        adapters = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
        return merge_state_dict(state, self.scaling), adapters

    def save(self, adapters: Mapping[str, torch.Tensor], out: Path,
             base_model: str | None = None) -> Path:
        return save_adapter(adapters, self, out, base_model)

    def fingerprint(self) -> dict[str, LoRAParams]:
        """The adapters' params (their code is in the run's code hash: the fit module adds
        this class's module to its import closure)."""
        return {"lora": {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                         "targets": list(self.targets)}}


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype,
                                               device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # what code that reads `.weight` (e.g. MFU) should see
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped: torch.Tensor = self.dropout(x)
        update = dropped @ self.lora_A.T @ self.lora_B.T  # (..., in) -> (..., out)
        base: torch.Tensor = self.base(x)
        return base + update * self.scaling

    def merged(self) -> torch.Tensor:
        """W + scaling * B A, the weight of the equivalent plain Linear."""
        w = self.base.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (w.float() + delta).to(w.dtype)


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the targeted Linears of each layer;
    returns the wrapped module names. The adapters are the only trainable parameters."""
    unknown = [t for t in spec.targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, layer in enumerate(typing.cast(nn.ModuleList, model.layers)):
        for t in spec.targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr, None)
            if base is None:  # e.g. gate on a GELU MLP
                raise ValueError(f"LoRA target {t!r}: this model has no {TARGETS[t]}")
            setattr(parent, attr, LoRALinear(base, spec.rank, spec.alpha, spec.dropout))
            wrapped.append(f"layers.{i}.{TARGETS[t]}")
    return wrapped


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_state_dict(state: Mapping[str, torch.Tensor], scaling: float
                     ) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the plain model's: ``X.base.weight`` + the update becomes
    ``X.weight``; adapters are dropped. Works on checkpoints as well as live models."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if ".base." in key:
            prefix, leaf = key.split(".base.")
            if leaf == "weight":
                a, b = state[f"{prefix}.lora_A"].float(), state[f"{prefix}.lora_B"].float()
                t = (t.float() + (b @ a) * scaling).to(t.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = t
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of ``model`` by a plain Linear holding the merged weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            base = module.base
            with torch.no_grad():
                base.weight.copy_(module.merged())
            setattr(model.get_submodule(parent_name), attr, base)
    return model


def adapter_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA state dict, named as PEFT names them on the Hugging Face export:
    ``layers.0.self_attn.q_proj.lora_A`` -> ``base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight``."""
    return {f"base_model.model.model.{k}.weight": t.detach().cpu().contiguous()
            for k, t in state.items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(state: Mapping[str, torch.Tensor], spec: LoRASpec, out: Path,
                 base_model: str | None = None) -> Path:
    """Write the adapters of ``state`` (PEFT layout) to directory ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(state)
    if not tensors:
        raise ValueError("the state dict holds no LoRA adapters")
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": sorted(TARGETS[t].split(".")[1] for t in spec.targets),
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
        "base_model_name_or_path": base_model, "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_spec(adapter_dir: Path) -> LoRASpec:
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    modules = set(config["target_modules"])
    unknown = modules - {v.split(".")[1] for v in TARGETS.values()}
    if unknown:
        raise ValueError(f"{adapter_dir}: target modules {sorted(unknown)} are not in this "
                         "model")
    return LoRASpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout", 0.0)),
                    targets=tuple(t for t, m in TARGETS.items() if m.split(".")[1] in modules))


def load_adapter(model: nn.Module, adapter_dir: Path) -> LoRASpec:
    """Wrap ``model`` (a base model) with the adapters saved in ``adapter_dir``."""
    from safetensors.torch import load_file

    spec = read_adapter_spec(adapter_dir)
    apply_lora(model, spec)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    state = {k.removeprefix("base_model.model.model.").removesuffix(".weight"): t
             for k, t in tensors.items()}
    missing = {k for k, _ in model.named_parameters() if k.endswith((".lora_A", ".lora_B"))}
    if missing != set(state):
        raise ValueError(f"{adapter_dir}: adapters do not match the model "
                         f"({len(state)} tensors for {len(missing)} adapter weights)")
    model.load_state_dict(state, strict=False)
    return spec
