"""HTTP service over :mod:`llmcore.infer.engine` (FastAPI): OpenAI-compatible, continuously batched.

    llmcore serve data/models/chat-int8 --host 127.0.0.1 --port 8000 --max-batch 16

Endpoints
  * ``GET /``: a chat page (static HTML + JS in the package, no CDN).
  * ``GET /health``: model name, size, context and the engine's load (no filesystem paths).
  * ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
  * ``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI's bodies and answers,
    streamed as server-sent events with ``"stream": true``.
  * ``POST /v1/generate``: llmcore's own batch endpoint (greedy by default).

Every request goes through one :class:`~llmcore.infer.engine.Engine`: concurrent requests share its
decode loop, past ``max_queue`` waiting requests the answer is 429 at once, and a client that
disconnects (streaming or not) cancels its request, which frees its slot at the next step.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 when a
request does not fit the model or has text UTF-8 cannot encode, 401 without the API key when
the server has one, 404 for an unknown route or model, 413 for a body over
``max_body`` bytes, 422 for a malformed body (the message names the field), 429 when the queue
is full. Nothing a client sends is a 500.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from llmcore.config.model import ModelConfig
from llmcore.data.corpus import unencodable
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.engine import Engine, QueueFull
from llmcore.infer.engine import Request as EngineRequest
from llmcore.infer.generate import Sampling
from llmcore.model.protocols import LanguageModel
from llmcore.model.qlinear import kernel_layers
from llmcore.serve.events import Inbox, events, pieces
from llmcore.serve.guard import ApiError, ApiKey, BodyLimit, error_body, install_error_handlers
from llmcore.serve.protocol import ChatRequest, CompletionRequest, GenerateRequest, SamplingFields


@dataclass
class _Served:
    """The one model a server serves and what every route needs of it."""

    model: LanguageModel
    cfg: ModelConfig
    tok: LLMTokenizer
    engine: Engine
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stop_ids(self) -> tuple[int, int]:
        return (self.tok.im_end_id, self.tok.eot_id)

    @property
    def context(self) -> int:
        return self.cfg.max_seq_len

    def budget(self, prompt: Sequence[int], max_new_tokens: int | None, field: str) -> int:
        """The max new tokens of a reply to ``prompt``: ``max_new_tokens`` (as the request's
        ``field`` asked), or all the context has left when None; a 400 stating the limits
        when they do not fit. (One internal name for the budget: max_new_tokens; the API's
        fields keep OpenAI's names.)"""
        if not prompt:
            raise ApiError(400, "the prompt is empty", "messages")
        room = self.context - len(prompt)
        if max_new_tokens is None:
            if room < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's "
                                    f"context is {self.context} tokens", "messages")
            return room
        if max_new_tokens > room:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and {field} is "
                                f"{max_new_tokens}; this model's context is {self.context} tokens, "
                                f"so prompt + {field} must be at most {self.context}", field)
        return max_new_tokens

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_id, ""):
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.model_id!r} (GET /v1/models)", "model",
                           "model_not_found")


def create_app(model_dir: Path, device: str = "auto", *, name: str | None = None,
               max_batch: int = 8, max_queue: int = 64, max_body: int = 1 << 20,
               engine_thread: bool = True, compile: bool = False,
               api_key: str | None = None) -> FastAPI:
    """The service for one model directory (loaded once, at creation); with ``api_key``,
    requests need ``Authorization: Bearer <api_key>`` (:class:`~llmcore.serve.guard.ApiKey`).

    ``engine_thread=False`` leaves running the decode loop (``app.state.engine.run()``) to
    the caller, which is what ``llmcore serve`` does from its main thread."""
    from llmcore.device import pick_device
    from llmcore.model.modeldir import load_model_dir

    model_dir = Path(model_dir)
    model, cfg = load_model_dir(model_dir, pick_device(device))
    tok = LLMTokenizer.load(model_dir)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue,
                    own_thread=engine_thread, compile=compile)
    served = _Served(model, cfg, tok, engine, name or model_dir.name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop()  # cancels what runs: open streams end instead of holding shutdown

    app = FastAPI(title="llmcore", description=f"Generation with {served.model_id}",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
    if api_key is not None:  # added last, so it runs first: no body is read for a stranger
        app.add_middleware(ApiKey, key=api_key)
    app.state.api_key_required = api_key is not None
    install_error_handlers(app)
    app.state.engine = engine
    _info_routes(app, served)
    _generation_routes(app, served)
    return app


def _info_routes(app: FastAPI, s: _Served) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("llmcore.serve").joinpath("web/chat.html").read_text("utf-8")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": s.model_id, "params": s.model.num_parameters(),
                "api_key_required": app.state.api_key_required,
                "positions": s.cfg.positions, "max_seq_len": s.context,
                "kernel_layers": kernel_layers(s.model), **s.engine.load()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s.model_id, s.created)]}

    @app.get("/v1/models/{mid:path}")
    def one_model(mid: str) -> dict[str, Any]:
        if mid != s.model_id:
            raise ApiError(404, f"model {mid!r} is not served here; this server serves "
                                f"{s.model_id!r}", "model", "model_not_found")
        return _model_card(s.model_id, s.created)


def _generation_routes(app: FastAPI, s: _Served) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        _encodable(body)
        s.check_model(body.model)
        if body.messages[-1].role == "assistant":
            raise ApiError(400, "the last message must be from the user or system", "messages")
        prompt = s.tok.encode_prompt([m.as_dict() for m in body.messages])
        max_new_tokens = s.budget(prompt, *body.max_new_tokens_field())
        jobs = [Job(0, i, prompt, body.sampling(max_new_tokens, i)) for i in range(body.n)]
        return await _answer(request, s, body, jobs, "chat.completion", "chatcmpl")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _encodable(body)
        s.check_model(body.model)
        jobs: list[Job] = []
        for p, text in enumerate(body.prompts()):
            ids = s.tok.encode_text(text)
            # OpenAI's default for completions: 16
            max_new_tokens = s.budget(ids, body.max_tokens or 16, "max_tokens")
            jobs += [Job(p, p * body.n + i, ids, body.sampling(max_new_tokens, i))
                     for i in range(body.n)]
        return await _answer(request, s, body, jobs, "text_completion", "cmpl")

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        _encodable(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        jobs: list[Job] = []
        for i, text in enumerate(prompts):
            ids = (s.tok.encode_text(text) if body.raw else
                   s.tok.encode_prompt([{"role": "user", "content": text}]))
            max_new_tokens = s.budget(ids, body.max_new_tokens, "max_new_tokens")
            sampling = Sampling(max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
            jobs.append(Job(i, i, ids, sampling))
        start = time.perf_counter()
        outs = await _collect(request, s.engine, jobs, s.stop_ids, ())
        return {"completions": [{"text": o.text, "tokens": o.tokens,
                                 "finish_reason": o.finish} for o in outs],
                "seconds": round(time.perf_counter() - start, 4)}


def _encodable(body: Any) -> None:
    """A 400 naming the field when text in the body cannot be encoded as UTF-8 (JSON allows
    a lone surrogate such as ``"\\ud800"``; the tokenizer cannot take it)."""
    for name, value in body.model_dump().items():
        bad = unencodable(value, name)
        if bad is not None:
            raise ApiError(400, str(bad), bad.field)


class Job(NamedTuple):
    """One completion to produce: which prompt, which choice of the answer, its ids, sampling."""

    prompt: int
    choice: int
    ids: list[int]
    sampling: Sampling


async def _answer(request: Request, s: _Served, body: SamplingFields, jobs: list[Job], kind: str,
                  prefix: str) -> Any:
    """An OpenAI answer (or its stream) for jobs (prompt index, choice index, ids, sampling)."""
    rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    now = int(time.time())
    prompt_tokens = sum(len(j.ids) for j in jobs if j.choice % body.n == 0)
    if body.stream:
        stops = list(body.stop or ())  # the validator made it a list
        chunks = await _stream(request, s.engine, jobs, s.stop_ids, stops, kind, rid, now,
                               s.model_id, prompt_tokens if body.include_usage() else None)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    outs = await _collect(request, s.engine, jobs, s.stop_ids, list(body.stop or ()))
    choices = []
    for job, o in zip(jobs, outs, strict=True):
        i = job.choice
        if kind == "chat.completion":
            choices.append({"index": i, "message": {"role": "assistant", "content": o.text},
                            "finish_reason": o.finish, "logprobs": None})
        else:
            choices.append({"index": i, "text": o.text, "finish_reason": o.finish,
                            "logprobs": None})
    completion = sum(o.tokens for o in outs)
    return {"id": rid, "object": kind, "created": now, "model": s.model_id,
            "choices": choices, "system_fingerprint": None,
            "usage": _usage(prompt_tokens, completion)}


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llmcore"}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Result:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.text, self.finish, self.tokens = "", "", 0


def _submit(engine: Engine, jobs: list[Job], stop_ids: Sequence[int], stops: Sequence[str],
            inbox: Inbox) -> list[EngineRequest]:
    """Queue the jobs on the engine; their events arrive in ``inbox`` as (index, Event)."""
    reqs = [EngineRequest(ids, s, inbox.sink(k), stop_ids, stops)
            for k, (_, _, ids, s) in enumerate(jobs)]
    try:
        engine.submit(*reqs)
    except QueueFull as exc:
        raise ApiError(429, str(exc), None, "rate_limit_exceeded") from None
    return reqs


async def _collect(request: Request, engine: Engine, jobs: list[Job], stop_ids: Sequence[int],
                   stops: Sequence[str]) -> list[_Result]:
    inbox = Inbox()
    reqs = _submit(engine, jobs, stop_ids, stops, inbox)
    results = [_Result() for _ in jobs]
    async with aclosing(events(request, inbox, reqs)) as batches:
        async for batch in batches:
            for k, event in batch:
                r = results[k]
                r.parts.append(event.text)
                if event.finish:
                    r.finish, r.tokens = event.finish, event.tokens
    for r in results:
        _check_finished(r.finish)
        r.text = "".join(r.parts)
    return results


def _check_finished(finish: str) -> None:
    if finish in ("", "cancelled"):
        raise ApiError(503, "the request was cancelled: the server is shutting down or the "
                            "client went away", None, "cancelled")
    if finish == "error":
        raise ApiError(503, "generation failed; the server logged the cause", None, "error")


async def _stream(request: Request, engine: Engine, jobs: list[Job], stop_ids: Sequence[int],
                  stops: Sequence[str], kind: str, rid: str, created: int, model_id: str,
                  prompt_tokens: int | None) -> AsyncIterator[str]:
    inbox = Inbox()
    reqs = _submit(engine, jobs, stop_ids, stops, inbox)  # a 429 here comes before any byte
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if kind == "chat.completion":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice.update(finish_reason=finish, logprobs=None)
        body = {"id": rid, "object": chunk_kind, "created": created, "model": model_id,
                "choices": [choice], "system_fingerprint": None}
        return f"data: {json.dumps(body)}\n\n"

    async def body() -> AsyncIterator[str]:
        completion = 0
        if kind == "chat.completion":
            for i in (j.choice for j in jobs):
                yield chunk(i, "", None, role=True)
        async with aclosing(events(request, inbox, reqs)) as batches:
            async for batch in batches:  # all that arrived since the last write: one write
                out, failed = pieces(batch, lambda k: jobs[k].choice)
                text = "".join(chunk(*p) for p in out)
                if failed:
                    yield text + f"data: {json.dumps(error_body(503, 'generation was cancelled'))}\n\n"
                    return
                completion += sum(e.tokens for _, e in batch if e.finish)
                if text:
                    yield text
        if prompt_tokens is not None:
            usage = {"id": rid, "object": chunk_kind, "created": created, "model": model_id,
                     "choices": [], "usage": _usage(prompt_tokens, completion)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    return body()
