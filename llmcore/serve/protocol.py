"""Request bodies of the HTTP service: OpenAI's chat and completions fields, and /v1/generate.

Every bound is here, so that a malformed body is a 422 naming its field before any work is
done. Fields of the OpenAI API that would change the output and are not implemented
(penalties, logprobs, tools, response_format) are refused with a message rather than silently
ignored; fields that change nothing here (``user``, ``store``, ``metadata``...) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmcore.infer.generate import Sampling

MAX_SEED = 2**63 - 1
MAX_N = 8
MAX_PROMPTS = 64


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(..., description="a string or a list of text parts")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role
        return {"role": "system" if self.role == "developer" else self.role,
                "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most; default: what "
                                   "the context has left")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop is up to 4 non-empty strings of at most 200 characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server (send 0 or omit it)")
        if self.logprobs:
            raise ValueError("logprobs is not supported by this server")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported")
        return self

    def max_new_tokens_field(self) -> tuple[int | None, str]:
        """The reply's token budget the request asks for (None: what the context has left),
        and the field that asked it, for an error to name: OpenAI's newer name first."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def sampling(self, max_new_tokens: int, index: int = 0) -> Sampling:
        # n > 1 with a seed: choice i uses seed + i, so the choices differ and each reproduces
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        return Sampling(max_new_tokens, self.temperature, self.top_k, self.top_p, seed)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1, max_length=1000)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="a prompt, or a list of prompts")

    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server (omit it or send n)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens is a chat field: /v1/completions takes "
                             "max_tokens")
        if not 1 <= len(self.prompts()) * self.n <= MAX_PROMPTS:
            raise ValueError(f"prompt: 1 to {MAX_PROMPTS} completions per request "
                             f"(prompts x n), got {len(self.prompts()) * self.n}")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class GenerateRequest(BaseModel):
    """llmcore's own endpoint: greedy by default, chat-templated unless ``raw``."""

    prompt: str | list[str] = Field(..., description="a prompt, or a list of up to "
                                    f"{MAX_PROMPTS}")
    raw: bool = Field(False, description="plain continuation, no chat template")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"a list of 1 to {MAX_PROMPTS} prompts")
        return v
