"""A decoder-only transformer whose switches are the things a learner compares.

Positions ``rope`` | ``learned`` | ``none``; norm ``rmsnorm`` | ``layernorm``; MLP ``swiglu`` |
``gelu``; grouped KV heads; tied embeddings; dropout. Pre-norm blocks, attention through
``scaled_dot_product_attention``. With rope + rmsnorm + swiglu and no biases the module names
and the math are those of Hugging Face's Llama (rotate-half RoPE, RMSNorm in fp32), so its
state dict maps 1:1 onto ``LlamaForCausalLM`` (a test checks the logits agree).

Shapes in comments: B batch, T tokens, D model width, H query heads, K key/value heads,
Hd head width, F MLP width, V vocabulary.

Architecture only: no loss, no optimizer, no sampling. ``forward`` takes an optional cache
(:class:`llmcore.model.protocols.KVCacheLike`: ``offset``, ``max_len``, ``attn_mask(T)``,
``update(layer, k, v)``, ``advance(T)``), and optional ``segments`` (B, T): the document each
token of a packed row belongs to. With ``doc_mask`` the loop passes them, and a token attends
only to earlier tokens of its own document, whose positions count from its first token, so a
packed row computes what each document would alone (a block-diagonal causal mask).

Inference (:meth:`Transformer.prepare_inference`): at batch 1 a decode step is hundreds of tiny
operator calls, so the time goes to dispatch, not arithmetic. Prepared for inference, q/k/v
come from one matmul and gate/up from another (the separate weights become views of the fused
ones: no extra memory, and an in-place update of one is an update of both), q and k are
rotated in one call, and RoPE's cos/sin come from a table instead of being recomputed each
step. Used only without autograd (training always takes the separate projections); undone by
``train()`` and by moving the model (``.to``, ``.float``), which would break the views.

Trade-offs: K/V heads are expanded with ``repeat_interleave`` before attention rather than
relying on SDPA's ``enable_gqa`` (newer torch only); the copy costs memory at long context.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.config.model import ModelConfig
from llmcore.model.protocols import KVCacheLike
from llmcore.model.qlinear import fuse_quantized


def rope_cache(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, ...]:
    """cos, sin for positions (T,) -> (T, Hd), or (B, T) -> (B, 1, T, Hd); fp32, rotate-half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))  # (Hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, Hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, Hd)
    if emb.ndim == 3:
        emb = emb[:, None]  # (B, 1, T, Hd): broadcast over heads
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, Hd) by position; pairs are (i, i + Hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    if x.dtype == torch.float32:  # no casts to dispatch (a decode step's ops are its cost)
        return x * cos + rotated * sin
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# a prepared projection: (weight, bias) for ``F.linear``, or a stacked quantized layer's call
Fused = tuple[torch.Tensor, torch.Tensor | None] | Callable[[torch.Tensor], torch.Tensor]


def fuse_linears(modules: list[nn.Module]) -> Fused | None:
    """One (sum of outs, in) weight (and bias) for linears sharing their input, the linears'
    own weights re-pointed at views of it; for int8 layers the stacked layer's call
    (:func:`llmcore.model.qlinear.fuse_quantized`); None otherwise (a LoRA layer computes
    more than its weight)."""
    if not all(type(m) is nn.Linear for m in modules):
        return fuse_quantized(modules)
    linears = typing.cast(list[nn.Linear], modules)
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])  # (sum of outs, in)
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        at = 0
        for m in linears:
            n = int(m.weight.shape[0])
            m.weight.data = weight[at : at + n]
            if bias is not None:
                m.bias.data = bias[at : at + n]
            at += n
    return weight, bias


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal, and only within the same document."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) position of each token within its document."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a document starts here
    starts = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.bias)
        self.qkv: Fused | None = None  # prepare_inference

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCacheLike | None = None, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Hd = self.n_heads, self.n_kv, self.head_dim
        if self.qkv is not None and not torch.is_grad_enabled():
            # inference: one matmul, and q and k rotated together
            qkv = (self.qkv(x) if callable(self.qkv) else F.linear(x, *self.qkv)
                   ).view(B, T, H + 2 * K, Hd).transpose(1, 2)
            qk, v = qkv[:, : H + K], qkv[:, H + K :]  # (B, H+K, T, Hd), (B, K, T, Hd)
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = self.q_proj(x).view(B, T, H, Hd).transpose(1, 2)  # (B, H, T, Hd)
            k = self.k_proj(x).view(B, T, K, Hd).transpose(1, 2)  # (B, K, T, Hd)
            v = self.v_proj(x).view(B, T, K, Hd).transpose(1, 2)  # (B, K, T, Hd)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, causal = None, cache is None
        if cache is not None:
            mask, causal = cache.attn_mask(T)  # before update: relative to the cached offset
            k, v = cache.update(self.layer, k, v)  # (B, K, S, Hd)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, Hd)
            v = v.repeat_interleave(rep, dim=1)
        dropout = self.cfg.dropout if self.training else 0.0
        if doc_mask is not None:  # (B, 1, T, T): packed documents do not see each other
            mask, causal = doc_mask, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Hd)
        out: torch.Tensor = self.o_proj(y)  # (B, T, D)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.gate_up: Fused | None = None  # prepare_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        if self.gate_up is not None and not torch.is_grad_enabled():
            fused = self.gate_up(x) if callable(self.gate_up) else F.linear(x, *self.gate_up)
            gate, up = fused.chunk(2, dim=-1)  # one matmul: (B, T, F) x 2
            h = F.silu(gate) * up
        elif self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, F)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, F)
        out: torch.Tensor = self.down_proj(h)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
                cache: KVCacheLike | None = None,
                doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, cache, doc_mask))
        mlp: torch.Tensor = self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + mlp


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                                if cfg.positions == "learned" else None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # prepare_inference
        self.reset_parameters()

    def prepare_inference(self, max_len: int | None = None) -> Transformer:
        """Fewer, larger ops for generation (see the module docstring); RoPE's table covers
        positions below ``max_len`` (default ``max_seq_len``). Returns the model, in eval mode."""
        self.eval()
        for block in self.blocks():
            attn, mlp = block.self_attn, block.mlp
            attn.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if mlp.kind == "swiglu":
                mlp.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        if self.cfg.positions == "rope":
            p = self.embed_tokens.weight
            cos, sin = rope_cache(self.cfg.head_dim, torch.arange(
                max_len or self.cfg.max_seq_len, device=p.device), self.cfg.rope_theta)
            self.rope_table = cos, sin
        return self

    def blocks(self) -> list[Block]:
        return [typing.cast(Block, b) for b in self.layers]

    def _unprepare(self) -> None:
        """Back to separate weights, each with its own storage again (so that saving, which
        refuses tensors sharing memory, and training see an ordinary model)."""
        self.rope_table = None
        for block in self.blocks():
            attn, mlp = block.self_attn, block.mlp
            for fused, linears in ((attn.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                   (mlp.gate_up, (getattr(mlp, "gate_proj", None), mlp.up_proj))):
                if fused is None:
                    continue
                for m in linears:  # (an int8 layer's weights are a buffer)
                    if m is not None:
                        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                            t.data = t.data.clone()
            attn.qkv, mlp.gate_up = None, None

    def train(self, mode: bool = True) -> Transformer:
        if mode:  # training takes the separate projections; nothing prepared may go stale
            self._unprepare()
        return super().train(mode)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> Transformer:
        self._unprepare()  # .to / .float make new weights: the fused views would be stale
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call, no-any-return]

    def reset_parameters(self) -> None:
        """normal(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1.0
                if name.endswith(("o_proj", "down_proj")):
                    scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, cache: KVCacheLike | None = None,
                positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` (B, T) overrides the default ``offset + arange(T)`` (left padding);
        ``segments`` (B, T) confines attention to each token's document (not with a cache);
        ``keep`` (B, T) bool: the logits of those positions only, (N, V) in row order.

        ``keep`` is for training on a loss mask: the head (D x V, most of a small model's
        compute) and the softmax run only where a loss is taken. SFT takes it on the replies,
        under half of its tokens."""
        B, T = input_ids.shape
        offset = cache.offset if cache is not None else 0
        doc_mask = None
        # one document in every row (the common case at inference): the plain causal kernel
        if segments is not None and bool((segments[:, -1] != segments[:, 0]).any()):
            assert cache is None, "segments are for training and scoring, not cached decoding"
            doc_mask = document_mask(segments)
            positions = segment_positions(segments) if positions is None else positions
        if self.cfg.positions == "learned":
            # the default positions' last one is known without reading the tensor: reading it
            # (.max()) would synchronise a GPU and break a compiled graph at every forward
            last = offset + T - 1 if positions is None else int(positions.max())
            if last >= self.cfg.max_seq_len:
                raise ValueError(f"position {last} is past the learned position table "
                                 f"(model.max_seq_len = {self.cfg.max_seq_len})")
        if positions is None:
            positions = torch.arange(offset, offset + T, device=input_ids.device)  # (T,)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        rope = None
        if self.cfg.positions == "learned":
            assert self.embed_positions is not None
            pos = self.embed_positions(positions)  # (T, D) or (B, T, D)
            x = x + (pos[None] if pos.ndim == 2 else pos)
        elif self.cfg.positions == "rope":
            rope = self._rope(positions, cache)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, rope, cache, doc_mask)
        if cache is not None:
            cache.advance(T)
        if keep is not None:
            x = x[keep]  # (N, D)
        logits: torch.Tensor = self.lm_head(self.norm(x))  # (B, T, V), or (N, V) with keep
        return logits

    def _rope(self, positions: torch.Tensor, cache: KVCacheLike | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions``: looked up in the table when a cache bounds them below
        its size (no sync needed to know they fit), computed otherwise."""
        table = self.rope_table
        if (table is None or cache is None or cache.max_len > table[0].shape[0]
                or torch.is_grad_enabled()):
            cos, sin = rope_cache(self.cfg.head_dim, positions, self.cfg.rope_theta)
            return cos, sin
        cos, sin = table[0][positions], table[1][positions]  # (T, Hd) or (B, T, Hd)
        if cos.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Hd): broadcast over heads
        return cos, sin

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def count_parameters(cfg: ModelConfig) -> int:
    """Closed-form parameter count; equals ``Transformer(cfg).num_parameters()``."""
    d, f, hd, v = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size
    b = 1 if cfg.bias else 0
    norm = d if cfg.norm == "rmsnorm" else d * (1 + b)
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attn = d * q_out + q_out * b + 2 * (d * kv_out + kv_out * b) + q_out * d + d * b
    n_up = 2 if cfg.mlp == "swiglu" else 1
    mlp = n_up * (d * f + f * b) + f * d + d * b
    per_layer = 2 * norm + attn + mlp
    total = v * d + cfg.n_layers * per_layer + norm
    if cfg.positions == "learned":
        total += cfg.max_seq_len * d
    if not cfg.tie_embeddings:
        total += v * d
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 x matmul params + attention scores (PaLM appendix B)."""
    matmul_params = count_parameters(cfg) - cfg.vocab_size * cfg.d_model  # embedding lookup
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.d_model  # the tied matrix is still the LM head
    if cfg.positions == "learned":
        matmul_params -= cfg.max_seq_len * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len // 2  # causal half
    return 6 * matmul_params + attention
