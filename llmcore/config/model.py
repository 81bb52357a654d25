"""The ``model:`` section: the decoder's shape (a preset plus per-field overrides) and the
presets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmcore.config.base import PARAMS_FILE
from llmcore.schema import ConfigError, JSONValue, parse_dataclass, spec


@dataclass(frozen=True)
class ModelConfig:
    """``model:`` the decoder's shape and switches (a preset plus per-field overrides)."""

    preset: str = spec("cpu-mini", doc="one of llmcore.config.model.PRESETS")
    vocab_size: int = spec(4096, ge=8, doc="set from the tokenizer by the stages")
    n_layers: int = spec(4, ge=1)
    d_model: int = spec(128, ge=8)
    n_heads: int = spec(4, ge=1)
    # None at construction means "derived" (__post_init__ fills it): always an int after
    n_kv_heads: int = spec(None, ge=1, doc="grouped KV heads; default n_heads")
    d_ff: int = spec(None, ge=1, doc="MLP width; default 4*d (gelu), ~8/3*d (swiglu)")
    max_seq_len: int = spec(1024, ge=8, doc="longest sequence (size of a learned table)")
    positions: str = spec("rope", choices=("rope", "learned", "none"))
    rope_theta: float = spec(1e6, gt=0)
    norm: str = spec("rmsnorm", choices=("rmsnorm", "layernorm"))
    norm_eps: float = spec(1e-5, gt=0)
    mlp: str = spec("swiglu", choices=("swiglu", "gelu"))
    bias: bool = spec(False)
    tie_embeddings: bool = spec(True)
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    doc_mask: bool = spec(True, doc="attention stays inside each document of a packed row, "
                                     "positions restart per document")

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            ff = 4 * self.d_model if self.mlp == "gelu" else int(8 * self.d_model / 3)
            object.__setattr__(self, "d_ff", -(-ff // 16) * 16)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_params(cls, raw: JSONValue) -> ModelConfig:
        """The ``model:`` section as params.yaml holds it (:func:`parse_model`)."""
        return parse_model(raw)

    def validate(self) -> list[str]:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"model.preset must be one of {', '.join(PRESETS)} "
                            f"(got {self.preset!r})")
        if self.d_model % self.n_heads:
            problems.append(f"model.d_model ({self.d_model}) must be divisible by "
                            f"model.n_heads ({self.n_heads})")
        elif self.positions == "rope" and self.head_dim % 2:
            problems.append(f"model.d_model / model.n_heads = {self.head_dim} must be even "
                            "for rope positions")
        assert self.n_kv_heads is not None
        if self.n_heads % self.n_kv_heads:
            problems.append(f"model.n_heads ({self.n_heads}) must be a multiple of "
                            f"model.n_kv_heads ({self.n_kv_heads})")
        return problems


# The model presets. Each is a full set of ModelConfig fields; params.yaml picks one with
# ``model.preset`` and may override any field.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: builds and trains in milliseconds
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # the CPU default (0.8M non-embedding parameters): the size the scaling study
    # (docs/scaling.md) finds near-optimal for the ~1e13-2e13 FLOPs a 2-core pretraining gets
    "cpu-mini": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=4, max_seq_len=1024),
    # four times the width: learns more per token, costs ~3x per token (the default until the
    # scaling study; the throughput benchmarks' shape)
    "cpu-small": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, max_seq_len=1024),
    # GPT-2 style: learned positions, layernorm with biases, GELU MLP
    "gpt2-mini": dict(n_layers=6, d_model=384, n_heads=6, max_seq_len=1024, positions="learned",
                      norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    # Llama style, ~0.5B parameters at vocab 6400 (GQA 16 query / 4 KV heads)
    "llama-0.5b": dict(n_layers=20, d_model=1536, n_heads=16, n_kv_heads=4, d_ff=4096,
                       max_seq_len=2048, tie_embeddings=True),
}


def parse_model(raw: JSONValue) -> ModelConfig:
    """``model:`` = a preset name plus overrides of any ModelConfig field."""
    raw = dict(raw or {}) if isinstance(raw, Mapping) else raw
    if not isinstance(raw, dict):
        raise ConfigError([f"{PARAMS_FILE}: model must be a mapping (got {raw!r})"])
    name = raw.get("preset") or ModelConfig.preset
    if name not in PRESETS:
        raise ConfigError([f"{PARAMS_FILE}: model.preset must be one of "
                           f"{', '.join(PRESETS)} (got {name!r})"])
    # null means "the preset's value", so params.yaml can list every key (and `dvc exp run
    # -S model.positions=learned` finds the key to override) without pinning the preset
    overrides = {k: v for k, v in raw.items() if v is not None}
    merged = {**PRESETS[name], **overrides, "preset": name}
    problems: list[str] = []
    obj = parse_dataclass(ModelConfig, merged, "model", problems)
    if problems:
        raise ConfigError([f"{PARAMS_FILE}: {p}" for p in problems])
    return obj
