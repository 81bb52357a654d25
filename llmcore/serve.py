"""HTTP service over :mod:`llmcore.generate` (FastAPI).

    llmcore serve data/models/sft-int8 --host 127.0.0.1 --port 8000

Endpoints
  * ``GET /health``: the model directory and its config.
  * ``POST /v1/generate``: one prompt or a list of prompts (a list is decoded as one batch),
    chat-templated unless ``raw``; returns the completions and why each stopped.
  * ``POST /v1/chat/completions``: OpenAI-style messages in, one assistant message out;
    ``"stream": true`` streams the reply as server-sent events (``data: {...}`` lines, then
    ``data: [DONE]``).

Bad requests get a 422 (schema) or 400 (does not fit the model) with a message naming the
field. Requests are served one at a time (a lock around the model): on a CPU, two decodes in
parallel are each slower than one after the other, and batching belongs inside a request.

Wraps generation only: nothing here imports training code.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llmcore.generate import Sampling, TextStreamer, generate, stream
from llmcore.tokenizer import LLMTokenizer, render_chat


class SamplingFields(BaseModel):
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)


class GenerateRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="a prompt, or a list decoded as one batch")
    raw: bool = Field(False, description="plain continuation, no chat template")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096, description="OpenAI name of "
                                   "max_new_tokens")


def create_app(model_dir: Path, device: str = "auto") -> FastAPI:
    """The service for one model directory (loaded once, at creation)."""
    from llmcore.device import pick_device
    from llmcore.modeldir import load_model_dir

    model_dir = Path(model_dir)
    model, cfg = load_model_dir(model_dir, pick_device(device))
    tok = LLMTokenizer.load(model_dir)
    stops = [tok.im_end_id, tok.eot_id]
    lock = threading.Lock()
    app = FastAPI(title="llmcore", description=f"Generation with {model_dir}")

    def encode(text: str) -> list[int]:
        ids = tok.encode(text)
        if not ids:
            raise HTTPException(400, "prompt is empty")
        if cfg.positions == "learned" and len(ids) >= cfg.max_seq_len:
            raise HTTPException(400, f"prompt has {len(ids)} tokens; this model reads at most "
                                     f"{cfg.max_seq_len - 1}")
        return ids

    def finish_reason(ids: list[int]) -> str:
        return "stop" if ids and ids[-1] in stops else "length"  # out of tokens or context

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_dir.name, "params": model.num_parameters(),
                "positions": cfg.positions, "max_seq_len": cfg.max_seq_len}

    @app.post("/v1/generate")
    def generate_endpoint(req: GenerateRequest) -> dict[str, Any]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise HTTPException(400, "prompt list is empty")
        texts = [p if req.raw else render_chat([{"role": "user", "content": p}],
                                               add_generation_prompt=True) for p in prompts]
        ids = [encode(t) for t in texts]
        start = time.perf_counter()
        with lock:
            outs = generate(model, ids, req.sampling(), stops, tok.pad_id, keep_stop=True)
        seconds = time.perf_counter() - start
        results = [{"text": tok.decode([t for t in o if t not in stops]),
                    "tokens": len([t for t in o if t not in stops]),
                    "finish_reason": finish_reason(o)} for o in outs]
        return {"completions": results, "seconds": round(seconds, 4)}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(req: ChatRequest) -> Any:
        if req.messages[-1].role == "assistant":
            raise HTTPException(400, "the last message must be from the user or system")
        sampling = req.sampling()
        if req.max_tokens is not None:
            sampling = Sampling(req.max_tokens, sampling.temperature, sampling.top_k,
                                sampling.top_p, sampling.seed)
        ids = encode(render_chat([m.model_dump() for m in req.messages],
                                 add_generation_prompt=True))
        if req.stream:
            return StreamingResponse(_sse(ids, sampling), media_type="text/event-stream")
        with lock:
            out = generate(model, [ids], sampling, stops, tok.pad_id, keep_stop=True)[0]
        text = tok.decode([t for t in out if t not in stops])
        return {
            "object": "chat.completion",
            "model": model_dir.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(out)}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                      "total_tokens": len(ids) + len(out)},
        }

    def _sse(ids: list[int], sampling: Sampling) -> Iterator[str]:
        streamer = TextStreamer(tok)
        with lock:
            for token in stream(model, ids, sampling, stops):
                piece = streamer.push(token)
                if piece:
                    chunk = {"object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {"content": piece}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return app
