"""The params of every stage as typed, frozen dataclasses; model presets.

Every stage reads the sections of ``params.yaml`` it needs and turns each one into a frozen
dataclass through :func:`parse_section` (checked by :mod:`llmcore.schema`). Validation happens
before any work starts, and every error names the key and what is allowed, e.g.
``params.yaml: tokenizer.vocab_size must be >= 260 (got 12)``. The defaults of each schema are
params.yaml's values (a test compares them), so a key left out means what the file says.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmcore.schema import ConfigError, JSONValue, UserError, parse_dataclass, spec

__all__ = ["ConfigError", "UserError"]  # re-exported: every module takes them from here

PARAMS_FILE = "params.yaml"
# the synthetic tasks with checkable answers (made by llmcore.data.tasks): the names params use
SYNTHETIC_TASKS = ("arithmetic", "spell", "count", "reverse")
CHAIN_MODELS = ("pretrain", "sft", "dpo", "rl")  # the models the evaluate stage can score


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """``base:`` settings shared by every stage."""

    seed: int = spec(1337, ge=0, doc="seed of every random choice in the pipeline")
    device: str = spec("auto", doc="auto | cpu | cuda | cuda:N | mps")
    dtype: str = spec("auto", choices=("auto", "float32", "bfloat16", "float16"))
    run_name: str | None = spec(None, doc="MLflow run name prefix; default: the stage name")
    tracking: str = spec("mlflow", choices=("mlflow", "none"))

    def validate(self) -> list[str]:
        ok = self.device in ("auto", "cpu", "cuda", "mps") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        if not ok:
            return [f"base.device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})"]
        return []


@dataclass(frozen=True)
class TaskWeights:
    """``fetch.synthetic_task_weights:`` each synthetic task's training conversations, as a
    multiple of ``fetch.synthetic_per_task``. Tasks differ in what they cost and teach: an
    arithmetic reply is a few tokens and its skill grows with examples; a reverse reply is
    several times longer and, past the letters it shares with spell, recalls its words."""

    arithmetic: float = spec(2.0, ge=0, doc="arithmetic conversations per synthetic_per_task")
    spell: float = spec(1.0, ge=0, doc="spell conversations per synthetic_per_task")
    count: float = spec(1.0, ge=0, doc="count conversations per synthetic_per_task")
    reverse: float = spec(1.0, ge=0, doc="reverse conversations per synthetic_per_task")

    def counts(self, per_task: int) -> dict[str, int]:
        """task -> training conversations for ``per_task`` (rounded)."""
        return {t: round(per_task * getattr(self, t)) for t in SYNTHETIC_TASKS}


@dataclass(frozen=True)
class FetchConfig:
    """``fetch:`` where the corpus comes from and how it is cleaned and split."""

    source: str = spec("builtin", choices=("builtin", "files", "hf"))
    paths: list[str] = spec(default_factory=list, doc="files or globs for source: files")
    text_field: str = spec("text", doc="field holding a document's text (jsonl, parquet, hf)")
    hf_dataset: str | None = spec(None, doc="Hugging Face dataset id or a local dataset folder")
    hf_config: str | None = spec(None)
    hf_split: str = spec("train")
    val_fraction: float = spec(0.1, gt=0.0, lt=0.5, doc="share of document groups (and "
                               "user conversations, preference prompts) held out for decisions")
    test_fraction: float = spec(0.1, ge=0.0, lt=0.5, doc="share held out for the reported "
                                "table, never for a decision")
    max_documents: int | None = spec(None, ge=1)
    max_bytes: int | None = spec(None, ge=1)
    min_chars: int = spec(1, ge=1, doc="documents shorter than this (after strip) are dropped")
    strict: bool = spec(False, doc="fail on the first malformed record instead of skipping it")
    builtin_code: bool = spec(False, doc="builtin: also the standard library's Python source, "
                                         "as training documents only")
    doc_questions: bool = spec(True, doc="add SFT questions answered from the stdlib docs")
    synthetic_per_task: int = spec(20000, ge=0, doc="SFT training examples per synthetic task")
    synthetic_task_weights: TaskWeights = spec(default_factory=TaskWeights,
                                               doc="per task: a multiple of synthetic_per_task")
    synthetic_val_per_task: int = spec(250, ge=0, doc="val examples per synthetic task, drawn "
                                       "from the val pools of words and operand pairs")
    synthetic_test_per_task: int = spec(250, ge=0, doc="test examples per synthetic task, "
                                        "drawn from the test pools")
    preference_paths: list[str] = spec(default_factory=list, doc="preference pairs for DPO: "
                                       ".jsonl / .parquet files or globs, MiniMind's dpo.jsonl "
                                       "(chosen / rejected message lists) or TRL's (prompt, "
                                       "chosen, rejected as strings or messages)")

    def validate(self) -> list[str]:
        problems = []
        if self.source == "files" and not self.paths:
            problems.append(
                "fetch.paths must list at least one file or glob when fetch.source is files"
            )
        if self.val_fraction + self.test_fraction >= 0.6:
            problems.append(f"fetch.val_fraction + fetch.test_fraction must be below 0.6 (got "
                            f"{self.val_fraction} + {self.test_fraction}): most data must train")
        if self.source == "hf" and not self.hf_dataset:
            problems.append(
                "fetch.hf_dataset must name a dataset (hub id or local folder) "
                "when fetch.source is hf"
            )
        return problems


@dataclass(frozen=True)
class TokenizerConfig:
    """``tokenizer:`` byte-level BPE training."""

    vocab_size: int = spec(4096, ge=260, le=65536 * 4)
    min_frequency: int = spec(2, ge=1)
    include_sft: bool = spec(True, doc="also train on the SFT conversations' text")
    max_train_bytes: int | None = spec(None, ge=1, doc="cap on the training text, in bytes")
    split_digits: bool = spec(True, doc="one token per digit (helps arithmetic)")


@dataclass(frozen=True)
class PackConfig:
    """``pack:`` token rows written as Arrow shards."""

    seq_len: int = spec(256, ge=8, le=1 << 20)
    rows_per_shard: int = spec(4096, ge=1)
    sft_overflow: str = spec("truncate", choices=("truncate", "drop"))
    sft_packing: bool = spec(True, doc="pack several conversations into a row while they fit")
    batch_documents: int = spec(256, ge=1, doc="documents per encode_batch call")
    pretrain_chat_share: float = spec(0.5, ge=0.0, le=0.9, doc="share of the pretraining "
                                      "train tokens that are SFT train conversations")
    letters_share: float = spec(0.3, ge=0.0, le=0.9, doc="share of the SFT train "
                                "conversations that spell one vocabulary piece (the letters "
                                "curriculum; 0: none)")


@dataclass(frozen=True)
class ModelConfig:
    """``model:`` the decoder's shape and switches (a preset plus per-field overrides)."""

    preset: str = spec("cpu-mini", doc="one of llmcore.config.PRESETS")
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


def parse_model(raw: Any) -> ModelConfig:
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


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer step's knobs, shared by every training section (pretrain, sft, dpo, rl).

    Each section is a subclass with its own defaults (params.yaml's), and the step
    (:class:`llmcore.train.step.OptimizerStep`) takes any of them: one set of fields, one
    meaning, whichever objective trains.
    """

    max_steps: int = spec(600, ge=1, doc="optimizer steps")
    grad_accum: int = spec(1, ge=1, doc="micro-batches per optimizer step")
    lr: float = spec(3e-3, gt=0)
    min_lr: float = spec(3e-4, ge=0)
    schedule: str = spec("cosine", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = spec(50, ge=0)
    decay_fraction: float = spec(0.2, gt=0, le=1, doc="wsd: share of steps spent decaying")
    optimizer: str = spec("muon", choices=("adamw", "muon"),
                          doc="muon: Muon for the blocks' matrices, AdamW for the rest")
    muon_momentum: float = spec(0.95, ge=0, lt=1)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    eps: float = spec(1e-8, gt=0)
    grad_clip: float = spec(1.0, ge=0, doc="max global grad norm; 0 disables")
    log_every: int = spec(20, ge=1, doc="steps between progress lines")
    checkpoint_every: int = spec(100, ge=1)
    keep_checkpoints: int = spec(2, ge=1)
    resume: str = spec("auto", choices=("auto", "never", "must"))

    def validate(self) -> list[str]:
        problems = []
        if self.min_lr > self.lr:
            problems.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if getattr(self, "epochs", None) is None and self.max_steps > 0 \
                and self.warmup_steps >= self.max_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be < max_steps "
                            f"({self.max_steps})")
        return problems


def _default(cls: type, name: str, value: Any, **bounds: Any) -> Any:
    """Field ``name`` of ``cls`` with another default (same doc; bounds as given, or same)."""
    meta = dict({f.name: f for f in dataclasses.fields(cls)}[name].metadata)
    meta.update(bounds)
    return field(default=value, metadata=meta)


# the fields of a section that change no number of its run (left out of its fingerprint)
NON_SHAPING = ("log_every", "checkpoint_every", "keep_checkpoints", "resume", "compile",
               "threads", "peak_flops", "nproc_per_node", "require_val", "dist_timeout")


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """``pretrain:`` the training loop; its defaults are params.yaml's ``pretrain:``."""

    max_steps: int = _default(OptimConfig, "max_steps", 400,
                              doc="optimizer steps (ignored when epochs is set)")
    epochs: float | None = spec(None, gt=0, doc="passes over the training rows; sets max_steps")
    # a sweep at 4e12 FLOPs on a 0.8M model (docs/scaling.md): lr 0.015 gave 1.847 bpb
    # against 1.956 at 0.003, and 8 rows per step 1.847 against 1.902 at 16 (lr 0.02)
    lr: float = _default(OptimConfig, "lr", 1.5e-2)
    min_lr: float = _default(OptimConfig, "min_lr", 1.5e-3)
    batch_size: int = spec(8, ge=1, doc="rows per micro-batch per process")
    eval_every: int = spec(200, ge=1)
    eval_batches: int = spec(20, ge=1)
    require_val: bool = spec(True, doc="false: train without validation when the val split "
                                       "has no rows (exports the last weights)")
    early_stopping_patience: int | None = spec(None, ge=1, doc="evals without improvement")
    export: str = spec("best", choices=("best", "last"), doc="which weights become the model")
    compile: bool = spec(False, doc="torch.compile the model")
    nproc_per_node: int = spec(1, ge=1, doc="> 1: run under torchrun (DDP or FSDP)")
    parallel: str = spec("ddp", choices=("ddp", "fsdp"),
                         doc="under torchrun: ddp (every rank holds the whole model) | fsdp "
                             "(parameters, gradients and optimizer state sharded per block)")
    dist_timeout: int = spec(900, ge=10, doc="seconds a rank waits for the others before the "
                                             "run stops (a lost node ends it, not hangs it)")
    threads: int | None = spec(None, ge=1, doc="CPU threads per process; None: torch default")
    peak_flops: float | None = spec(None, gt=0, doc="device peak FLOP/s for MFU; None: measure")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # llmcore.model.lora.TARGETS' keys


@dataclass(frozen=True)
class LoRAConfig:
    """``sft.lora:`` the adapters trained when ``sft.method`` is lora."""

    rank: int = spec(8, ge=1, doc="rank of each adapter")
    alpha: float = spec(16.0, gt=0, doc="the update is scaled by alpha / rank")
    dropout: float = spec(0.0, ge=0, lt=1, doc="dropout on the adapters' input")
    targets: list[str] = spec(default_factory=lambda: list(LORA_TARGETS),
                              doc="q k v o (attention), gate up down (MLP)")

    def validate(self) -> list[str]:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            return [f"targets must be a non-empty list from {', '.join(LORA_TARGETS)} "
                    f"(got {self.targets})"]
        return []


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """``sft:`` the same loop with fine-tuning defaults (params.yaml's ``sft:``)."""

    method: str = spec("full", choices=("full", "lora"),
                       doc="full: every weight trains; lora: adapters only (sft.lora)")
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    max_steps: int = _default(TrainConfig, "max_steps", 1600)
    batch_size: int = _default(TrainConfig, "batch_size", 16)
    lr: float = _default(TrainConfig, "lr", 1.5e-2)
    min_lr: float = _default(TrainConfig, "min_lr", 1.5e-3)
    warmup_steps: int = _default(TrainConfig, "warmup_steps", 20)
    optimizer: str = _default(TrainConfig, "optimizer", "muon")
    eval_every: int = _default(TrainConfig, "eval_every", 400)


@dataclass(frozen=True)
class DPOConfig(OptimConfig):
    """``dpo:`` preference optimisation of the SFT model, its frozen self as the reference."""

    max_steps: int = _default(OptimConfig, "max_steps", 30, ge=0,
                              doc="optimizer steps; 0: the stage copies the SFT model")
    beta: float = spec(0.1, gt=0, doc="strength of the pull towards the reference")
    nll_coef: float = spec(1.0, ge=0, doc="weight of the chosen replies' NLL per token (RPO); "
                                         "0: plain DPO")
    lr: float = _default(OptimConfig, "lr", 1e-4)
    min_lr: float = _default(OptimConfig, "min_lr", 1e-5)
    warmup_steps: int = _default(OptimConfig, "warmup_steps", 10)
    optimizer: str = _default(OptimConfig, "optimizer", "adamw")
    weight_decay: float = _default(OptimConfig, "weight_decay", 0.0)
    log_every: int = _default(OptimConfig, "log_every", 10)
    checkpoint_every: int = _default(OptimConfig, "checkpoint_every", 30)
    batch_size: int = spec(16, ge=1, doc="preference pairs per step (split over grad_accum)")
    eval_every: int = spec(30, ge=1)
    pairs_per_task: int = spec(100, ge=0, doc="builtin on-policy pairs per synthetic task, "
                                              "from training conversations")
    val_pairs_per_task: int = spec(25, ge=0, doc="held-out pairs per task (val conversations)")
    max_new_tokens: int = spec(96, ge=1, doc="length of the SFT model's own answers")
    corpus_pairs: bool = spec(True, doc="also train on the pairs of fetch.preference_paths")
    method: str = spec("full", choices=("full", "lora"))
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of "
                            f"grad_accum ({self.grad_accum})")
        return problems


@dataclass(frozen=True)
class RLConfig(OptimConfig):
    """``rl:`` GRPO on the checkable tasks, starting from the DPO model."""

    algorithm: str = spec("grpo", choices=("grpo",))
    max_steps: int = _default(OptimConfig, "max_steps", 20, ge=0,
                              doc="policy updates; 0: the stage copies the DPO model")
    lr: float = _default(OptimConfig, "lr", 1e-4)
    min_lr: float = _default(OptimConfig, "min_lr", 1e-5)
    schedule: str = _default(OptimConfig, "schedule", "constant")
    warmup_steps: int = _default(OptimConfig, "warmup_steps", 0)
    optimizer: str = _default(OptimConfig, "optimizer", "adamw")
    weight_decay: float = _default(OptimConfig, "weight_decay", 0.0)
    log_every: int = _default(OptimConfig, "log_every", 1)
    checkpoint_every: int = _default(OptimConfig, "checkpoint_every", 10)
    prompts_per_step: int = spec(8, ge=1)
    group_size: int = spec(8, ge=2, doc="replies sampled per prompt")
    temperature: float = spec(1.0, gt=0)
    max_new_tokens: int = spec(96, ge=1)
    clip: float = spec(0.2, gt=0, lt=1, doc="PPO clipping of the probability ratio")
    kl_coef: float = spec(0.04, ge=0, doc="weight of the KL penalty to the reference")
    inner_epochs: int = spec(1, ge=1, doc="optimisation passes over each sampled batch")
    no_end_penalty: float = spec(0.1, ge=0, doc="subtracted when a reply does not end with "
                                               "<|im_end|>")
    tasks: list[str] = spec(default_factory=lambda: list(SYNTHETIC_TASKS))
    eval_per_task: int = spec(100, ge=0, doc="held-out conversations per task for the "
                                             "before / after exact match")
    method: str = spec("full", choices=("full", "lora"))
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    def validate(self) -> list[str]:
        problems = super().validate()
        bad = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
        if bad or not self.tasks:
            problems.append(f"tasks must be a non-empty list from {', '.join(SYNTHETIC_TASKS)} "
                            f"(got {self.tasks})")
        return problems


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate:`` comparing the pretrained and the SFT model."""

    batch_size: int = spec(16, ge=1)
    max_rows: int | None = spec(None, ge=1, doc="cap on validation rows for loss / bpb")
    context_factors: list[int] = spec(default_factory=lambda: [1, 2, 4],
                                      doc="bpb at these multiples of the training context")
    max_task_examples: int = spec(250, ge=1, doc="held-out conversations per task")
    max_new_tokens: int = spec(96, ge=1)
    choices: int = spec(4, ge=2, doc="answers per multiple-choice doc question")
    contamination_ngram: int = spec(13, ge=8, le=50, doc="words in a run shared with a "
                                    "training stream that marks an example contaminated (the "
                                    "check always runs)")
    models: list[str] = spec(default_factory=lambda: list(CHAIN_MODELS),
                             doc="the models of the chain to score (a quick comparison that "
                                 "skips alignment scores pretrain and sft only)")
    prompts: list[str] = spec(default_factory=lambda: [
        "What is 12 + 7?",
        "Spell the word 'python'.",
        "Reverse the letters of the word 'stack'.",
        "What is 17 + 21?",
        "Spell the word 'concrete'.",
        "Reverse the letters of the word 'absent'.",
        "What does `subprocess.Popen.poll` do?",
        "What is the Python `statistics` module for?",
    ], doc="prompts every model answers in reports/samples.md, each shown with the split its "
           "word, operands or document fall in (the defaults: the README's three questions, "
           "then test words of several tokens, a test pair and test documents)")

    def validate(self) -> list[str]:
        if not self.models or any(m not in CHAIN_MODELS for m in self.models) or \
                len(set(self.models)) != len(self.models):
            return [f"evaluate.models must be a non-empty list of distinct names from "
                    f"{', '.join(CHAIN_MODELS)} (got {self.models})"]
        if 1 not in self.context_factors or any(f < 1 for f in self.context_factors):
            return [f"evaluate.context_factors must be integers >= 1 and include 1 (the "
                    f"training context) (got {self.context_factors})"]
        return []


@dataclass(frozen=True)
class QuantizeConfig:
    """``quantize:`` weight-only quantization of the SFT model."""

    method: str = spec("int8", choices=("int8", "int4"))
    group_size: int = spec(64, ge=2, doc="int4: input columns sharing one scale")
    runtime: str = spec("auto", choices=("auto", "dequant", "int8mm"),
                        doc="how quantized weights run: expanded at load, or int8 kernel")
    agreement_prompts: int = spec(32, ge=1, doc="held-out prompts for greedy agreement")
    agreement_tokens: int = spec(32, ge=1)
    decode_tokens: int = spec(64, ge=8, doc="tokens decoded to time decode speed")
    gguf: str | None = spec("q8_0", choices=(None, "f32", "f16", "q8_0"),
                            doc="also write the SFT model as model.gguf (llama.cpp) in the "
                                "quantized directory, of this type")


@dataclass(frozen=True)
class FlowTimeouts:
    """``flow.timeouts:`` seconds a stage may run under the Prefect flow before it is killed."""

    fetch: float = spec(1800.0, gt=0)
    tokenizer: float = spec(1800.0, gt=0)
    pack: float = spec(3600.0, gt=0)
    pretrain: float = spec(86400.0, gt=0)
    sft: float = spec(86400.0, gt=0)
    dpo: float = spec(14400.0, gt=0)
    rl: float = spec(14400.0, gt=0)
    evaluate: float = spec(7200.0, gt=0)
    quantize: float = spec(3600.0, gt=0)


@dataclass(frozen=True)
class FlowConfig:
    """``flow:`` the Prefect flow's scheduling (read by stages/flow.py; no stage depends on it)."""

    retries: int = spec(1, ge=0, doc="retries of a stage that failed for another reason than "
                                     "bad input (a stage's bad-input exit is never retried)")
    retry_delay: float = spec(10.0, ge=0, doc="seconds between tries")
    timeouts: FlowTimeouts = spec(default_factory=FlowTimeouts)


# Sections of params.yaml and their schemas (``flow:`` is the Prefect flow's, not a stage's).
SECTIONS: dict[str, type] = {
    "base": BaseConfig,
    "fetch": FetchConfig,
    "tokenizer": TokenizerConfig,
    "pack": PackConfig,
    "model": ModelConfig,
    "pretrain": TrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rl": RLConfig,
    "evaluate": EvaluateConfig,
    "quantize": QuantizeConfig,
    "flow": FlowConfig,
}


def parse_section(name: str, raw: Any, cls: type | None = None) -> Any:
    """Validate one params section and return its typed config.

    Raises :class:`ConfigError` listing every problem as ``params.yaml: <key> ...``.
    """
    if name == "model" and cls is None:
        return parse_model(raw)
    cls = cls or SECTIONS.get(name)
    if cls is None:
        raise ConfigError([f"{PARAMS_FILE}: unknown section {name!r} (known: {', '.join(SECTIONS)})"])
    problems: list[str] = []
    obj = parse_dataclass(cls, raw, name, problems)
    if problems:
        raise ConfigError([f"{PARAMS_FILE}: {p}" for p in problems])
    return obj


def check_sections(params: Mapping[str, Any]) -> None:
    """Every top-level section of params.yaml must be one that something reads."""
    known = list(SECTIONS)
    problems = []
    for name in params:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{PARAMS_FILE}: unknown section {name!r} ({hint}known: "
                            f"{', '.join(known)})")
    if problems:
        raise ConfigError(problems)


def parse_sections(params: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """Validate several sections of a params mapping; all problems are reported together."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = parse_section(name, params.get(name))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out


def flatten(prefix: str, cfg: object) -> dict[str, JSONValue]:
    """``{"prefix.key": value}`` for a config (or a plain dict), nested keys joined by dots."""
    out: dict[str, JSONValue] = {}

    def walk(p: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{p}.{k}", v)
        else:
            out[p] = value

    if not isinstance(cfg, dict) and not dataclasses.is_dataclass(cfg):
        raise TypeError(f"flatten needs a dataclass or a dict (got {type(cfg).__name__})")
    walk(prefix, cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))  # type: ignore[arg-type]
    return out
