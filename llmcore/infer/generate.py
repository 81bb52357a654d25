"""Generation on token ids: an explicit KV cache, sampling, batching and streaming.

* :class:`KVCache` preallocates keys and values for every layer, ``(B, K, max_len, Hd)``, and
  the model writes each step's new keys/values at ``offset``. Decoding a token then costs one
  forward of one position instead of the whole sequence.
* Sampling: greedy (``temperature == 0``), temperature, top-k, top-p (nucleus), seeded through
  a ``torch.Generator`` so that a seed reproduces a sample.
* Batches of prompts of different lengths are left-padded; each row gets its own positions
  (counted from its first real token) and a key-padding mask, so a batched row produces the
  same tokens as that prompt alone (up to float rounding of the batched kernels).
* Stops per row on any of ``stop_ids`` (``<|im_end|>``, ``<|endoftext|>``) or after
  ``max_new_tokens``; :func:`stream` yields tokens one at a time.

Trade-off: the cache is preallocated at ``prompt + max_new_tokens`` (bounded by the model's
``max_seq_len`` for learned positions); memory is reserved up front instead of growing with
concatenations, which would re-copy the cache at every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llmcore.data.tokenizer import LLMTokenizer
from llmcore.model.protocols import LanguageModel


def cache_tensors(model: LanguageModel, rows: int, max_len: int
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed keys and values, one (rows, K, max_len, Hd) tensor per layer, on the model's
    device and in its dtype: the storage of :class:`KVCache` and of the engine's slots."""
    cfg, p = model.cfg, next(model.parameters())
    shape = (rows, cfg.n_kv_heads, max_len, cfg.head_dim)
    return ([torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)])


def utf8_ready(text: str) -> int:
    """How much of a decoded prefix can be shown: all but a trailing incomplete multi-byte
    character (which decodes to U+FFFD until its last byte arrives)."""
    return len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)


class KVCache:
    """Keys and values of every layer for a batch, plus the key-padding mask
    (a :class:`~llmcore.model.protocols.KVCacheLike`)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor],
                 key_padding: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v  # per layer (B, K, max_len, Hd)
        self.max_len = k[0].shape[2]
        self.offset = 0  # positions already filled
        # (B, max_len) True where the key is a real token; None when no row is padded
        self.key_padding = key_padding
        self._mask: tuple[tuple[int, int], tuple[torch.Tensor | None, bool]] | None = None

    @classmethod
    def for_model(cls, model: LanguageModel, batch: int, max_len: int,
                  key_padding: torch.Tensor | None = None) -> KVCache:
        return cls(*cache_tensors(model, batch, max_len), key_padding)

    def attn_mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T queries at positions offset..offset+T-1; the same for every
        layer of one forward, so it is built once per step."""
        if self._mask is not None and self._mask[0] == (self.offset, T):
            return self._mask[1]
        past, S = self.offset, self.offset + T
        if past == 0 and self.key_padding is None:
            out: tuple[torch.Tensor | None, bool] = (None, True)  # the plain causal kernel
        elif T == 1 and self.key_padding is None:
            out = (None, False)  # one query sees every cached key: no mask at all
        else:  # queries see every key up to their own position, and no padding
            mask = torch.ones(T, S, dtype=torch.bool, device=self.k[0].device).tril(past)
            if self.key_padding is not None:  # (B, S): False where a batch row has padding
                mask = mask[None, None] & self.key_padding[:, None, None, :S]
            out = (mask, False)
        self._mask = ((self.offset, T), out)
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, K, T, Hd) at the current offset; return keys/values up to it."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        self.k[layer][:, :, self.offset : end] = k
        self.v[layer][:, :, self.offset : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.offset += n


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None
                ) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
            real[i, longest - len(p):] = True
    return ids.to(device), real.to(device)


@torch.no_grad()
def stream_batch(model: LanguageModel, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 stop_ids: Sequence[int] = (), pad_id: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), active (B,)) per step; ``active`` is False for finished rows."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    ids, real = _left_pad(prompts, pad_id, device)
    B, T = ids.shape
    total = T + sampling.max_new_tokens
    if model.cfg.positions == "learned":  # the position table bounds the whole sequence
        if T > model.cfg.max_seq_len:
            raise ValueError(f"prompt of {T} tokens does not fit model.max_seq_len "
                             f"{model.cfg.max_seq_len}")
        total = min(total, model.cfg.max_seq_len)
    padded = not bool(real.all())
    key_padding = None
    if padded:
        key_padding = torch.ones(B, total, dtype=torch.bool, device=device)
        key_padding[:, :T] = real
    cache = KVCache.for_model(model, B, total, key_padding)
    pad_len = (~real).sum(dim=1)  # (B,)
    positions = (torch.arange(T, device=device)[None] - pad_len[:, None]).clamp(min=0)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    logits = model(ids, cache=cache, positions=positions if padded else None)[:, -1]
    stops = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = T - pad_len  # (B,) position of the next token per row
    for _ in range(min(sampling.max_new_tokens, total - T)):
        tok = sample_next(logits, sampling, generator)
        tok = torch.where(active, tok, torch.full_like(tok, pad_id))
        yield tok, active.clone()
        if len(stops):
            active &= ~torch.isin(tok, stops)
        if not bool(active.any()) or cache.offset >= total:
            return
        pos = next_pos[:, None] if padded else None
        logits = model(tok[:, None], cache=cache, positions=pos)[:, -1]
        next_pos = next_pos + 1


def generate(model: LanguageModel, prompts: Sequence[Sequence[int]], sampling: Sampling,
             stop_ids: Sequence[int] = (), pad_id: int = 0, keep_stop: bool = False
             ) -> list[list[int]]:
    """New tokens for each prompt (the stop token is dropped unless ``keep_stop``)."""
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    for tok, active in stream_batch(model, prompts, sampling, stop_ids, pad_id):
        for i, (t, a) in enumerate(zip(tok.tolist(), active.tolist(), strict=True)):
            if a and (keep_stop or t not in stops):
                out[i].append(t)
    return out


def stream(model: LanguageModel, prompt: Sequence[int], sampling: Sampling,
           stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Tokens of one prompt as they are produced (the stop token is not yielded)."""
    stops = set(stop_ids)
    for tok, _ in stream_batch(model, [prompt], sampling, stop_ids):
        t = int(tok[0])
        if t in stops:
            return
        yield t


@torch.no_grad()
def generate_no_cache(model: LanguageModel, prompt: Sequence[int], max_new_tokens: int,
                      stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding that recomputes the whole sequence each step (the reference)."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(model(ids)[0, -1].argmax())
        if tok in stop_ids:
            break
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
    return out


class Detokenizer:
    """The text of a growing token stream, decoded incrementally: one decoder for the CLI's
    stream and the server's replies.

    The text of the tokens up to the last complete character is kept, and only the tokens
    after it are decoded at each step (decoding every id at every step would grow with the
    reply). A character split across tokens decodes to U+FFFD until its last byte arrives (at
    most 4 bytes, so 4 tokens); byte-level decoding then equals decoding every id. ``sent``
    counts the characters already handed out by :meth:`emit`.
    """

    def __init__(self, tokenizer: LLMTokenizer) -> None:
        self.tok = tokenizer
        self._done, self._pending = "", list[int]()
        self.sent = 0

    def push(self, token: int) -> str:
        """Add one token; the whole text so far (a trailing partial character as U+FFFD)."""
        self._pending.append(token)
        tail = self.tok.decode(self._pending)
        text = self._done + tail
        if not tail.endswith("\ufffd") or len(self._pending) >= 4:
            self._done, self._pending = text, []
        return text

    @property
    def text(self) -> str:
        return self._done + self.tok.decode(self._pending)

    def emit(self, text: str, upto: int | None = None) -> str:
        """The part of ``text`` not handed out yet, up to ``upto`` characters (default: all
        but a trailing incomplete character); empty when nothing new is ready."""
        ready = utf8_ready(text) if upto is None else upto
        if ready <= self.sent:
            return ""
        piece, self.sent = text[self.sent : ready], ready
        return piece

    def stream(self, token: int) -> str:
        """Add one token and return the text it completes (what a terminal prints)."""
        return self.emit(self.push(token))


