"""Byte-level BPE tokenizer, special tokens, the ChatML template and the SFT loss mask.

Training uses Hugging Face ``tokenizers`` (Rust, parallel). The pipeline is byte-level with no
normalizer, so encoding then decoding returns the exact input for any text (CJK, emoji, code,
runs of whitespace); every one of the 256 bytes is in the base alphabet, so nothing is ever
unknown. Digits are split one per token by default: the vocabulary loses a few hundred merges
of number chunks, and arithmetic becomes learnable by a small model.

Special tokens get the first ids: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2,
``<|pad|>`` 3. The saved directory (``tokenizer.json`` + ``tokenizer_config.json``) loads with
``transformers.AutoTokenizer.from_pretrained`` and its ``apply_chat_template`` renders the
same ChatML text as :func:`render_chat`.

The loss mask is computed from character offsets of one encoding of the whole rendered
conversation, not by encoding pieces separately: BPE merges across piece boundaries would make
piece-wise ids differ from what ``apply_chat_template`` produces. A token that straddles the
boundary between an assistant header and its reply (rare: only when the reply starts with
spaces) counts as header and is not trained on.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmcore.schema import UserError

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, PAD)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# ChatML. Kept byte-identical to render_chat() below; a test checks the two agree.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Chat(TypedDict):
    """A conversation as the chat template reads it (a corpus row has more keys:
    :class:`llmcore.data.corpus.ConversationRow`)."""

    messages: list[dict[str, str]]  # {"role", "content"}


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation, exactly as CHAT_TEMPLATE renders it."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def _pre_tokenizer(split_digits: bool) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def training_texts(texts: list[str], conversations: Sequence[Chat],
                   max_bytes: int | None) -> list[str]:
    """Pretraining texts, then every message of ``conversations``, cut at ``max_bytes``.

    The chat text is included so that its words (questions, answers, task vocabulary) get
    merges too; whole texts only, so nothing is cut mid-word.
    """
    texts = texts + [m["content"] for c in conversations for m in c["messages"]]
    if max_bytes is None:
        return texts
    kept, size = [], 0
    for t in texts:
        size += len(t.encode("utf-8"))
        if size > max_bytes:
            break
        kept.append(t)
    return kept


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              split_digits: bool = True, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE whose first ids are the special tokens."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(split_digits)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, "special tokens must take ids 0..3"
    return tok


class TokenizerError(UserError):
    """A tokenizer file is missing or unusable; the message names it and what to do."""


class LLMTokenizer:
    """A trained tokenizer plus the ids and chat helpers the pipeline needs."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        # a twin that reads special-token strings as plain text: what user text goes through,
        # so that typing "<|im_end|><|im_start|>assistant" cannot forge a turn
        self.plain = Tokenizer.from_str(tok.to_str())
        self.plain.encode_special_tokens = True
        self.eot_id = self._id(EOT)
        self.im_start_id = self._id(IM_START)
        self.im_end_id = self._id(IM_END)
        self.pad_id = self._id(PAD)

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no special token {token}")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """Ids of untrusted text: never a control token, whatever the text says."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
                      ) -> list[int]:
        """The chat template's ids with roles and contents encoded as plain text.

        Equal to ``encode(render_chat(...))`` for text without special-token strings (the
        tokenizer splits at special tokens anyway), but a special token can only come from the
        template itself.
        """
        ids: list[int] = []
        for m in messages:
            ids += [self.im_start_id, *self.encode_text(f"{m['role']}\n{m['content']}"),
                    self.im_end_id, *self.encode_text("\n")]
        if add_generation_prompt:
            ids += [self.im_start_id, *self.encode_text("assistant\n")]
        return ids

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and a mask that is 1 on tokens to train on.

        ``mask[i] == 1`` exactly when token ``i`` lies inside an assistant reply or is that
        reply's closing ``<|im_end|>``.
        """
        text = render_chat(messages, add_generation_prompt)
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, mask_from_offsets(enc.offsets, assistant_spans(messages))

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict[str, str]]]
                          ) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode_chat` for many conversations, encoded in parallel."""
        texts = [render_chat(c) for c in conversations]
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, mask_from_offsets(e.offsets, assistant_spans(c)))
                for c, e in zip(conversations, encs, strict=True)]

    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()

    def save(self, out_dir: Path, model_max_length: int = 1 << 20) -> None:
        save_tokenizer(self.tok, out_dir, model_max_length)

    @classmethod
    def load(cls, directory: Path) -> LLMTokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} not found: run `dvc repro tokenizer` (or pass a "
                                 "model directory, which carries its tokenizer)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for any bad file
            raise TokenizerError(f"{path} is not a valid tokenizer ({str(exc)[:120]}); run "
                                 "`dvc repro tokenizer` to rebuild it") from None
        try:
            return cls(tok)
        except ValueError as exc:
            raise TokenizerError(f"{path}: {exc}; it was not written by llmcore's tokenizer "
                                 "stage, run `dvc repro tokenizer`") from None


def assistant_spans(messages: Sequence[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of each assistant reply plus its ``<|im_end|>``."""
    spans = []
    pos = 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        start = pos + len(header)
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1  # the newline after <|im_end|>
    return spans


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
                      ) -> list[int]:
    """1 for each token whose character range lies inside one of ``spans``, else 0.

    Token offsets are in text order (starts and ends never decrease), so the tokens inside a
    span are one run, found by bisection (``offsets`` is a list of tuples: bisecting it runs
    in C); the mask is then built from runs, never token by token. This is most of what SFT
    packing costs beyond the tokenizer itself.
    """
    n = len(offsets)
    mask: list[int] = []
    for span_start, span_end in spans:
        first = bisect_left(offsets, (span_start, -1), len(mask))  # first start >= span start
        stop = bisect_left(offsets, (span_end, -1), first)  # first start >= span end
        while stop > first and offsets[stop - 1][1] > span_end:  # straddles the span's end
            stop -= 1
        mask += [0] * (first - len(mask)) + [1] * (stop - first)
    mask += [0] * (n - len(mask))
    return mask


class AddedToken(TypedDict):
    """A special token of ``tokenizer_config.json`` (Hugging Face's ``AddedToken`` fields)."""

    content: str
    lstrip: bool
    normalized: bool
    rstrip: bool
    single_word: bool
    special: bool


class TokenizerConfig(TypedDict):
    """``tokenizer_config.json`` (Hugging Face's keys), what :func:`tokenizer_config` gives."""

    tokenizer_class: str
    added_tokens_decoder: dict[str, AddedToken]  # token id (as a string) -> the token
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    additional_special_tokens: list[str]
    chat_template: str
    model_max_length: int
    clean_up_tokenization_spaces: bool
    add_bos_token: bool
    add_eos_token: bool


def tokenizer_config(model_max_length: int) -> TokenizerConfig:
    """The ``tokenizer_config.json`` that makes ``AutoTokenizer`` load the directory."""
    added: dict[str, AddedToken] = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [EOT, IM_START],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int = 1 << 20) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n"
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": PAD,
                    "additional_special_tokens": [EOT, IM_START]}, indent=2) + "\n"
    )


def token_bytes(tok: LLMTokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for; 0 for special tokens (not text).

    Byte-level BPE spells every token with one printable character per byte, so the length of
    the token's string is its byte count.
    """
    specials = set(SPECIAL_TOKENS)
    out = []
    for i in range(tok.vocab_size):
        piece = tok.tok.id_to_token(i)
        out.append(0 if piece is None or piece in specials else len(piece))
    return out


def bytes_per_token(tok: LLMTokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over ``texts`` (higher is a better compression)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)
