"""Continuous batching: many requests share one decode loop over one model.

A request is admitted into a free *slot* of a :class:`~llmcore.infer.slots.SlotCache` (its
own rows of every layer's keys and values), its prompt is prefilled (with those of every
request admitted at the same step, in one forward), and from then on it takes part in the
batched decode step that advances every running request by one token. A finished or cancelled
request leaves at once and its slot takes the next waiting request at the next step, so a long
reply never holds the others back and a new request waits one step, not one whole reply.

Each request keeps its own sampling params, stop tokens, stop strings and seeded generator, and
its rows see only its own keys (a per-row length mask), so it produces what it would alone (up
to float rounding of the batched matmuls; a test checks greedy outputs are identical).

One thread (``Engine.run``) owns the model; callers talk to it through :meth:`Engine.submit`
(a bounded waiting queue: :class:`QueueFull` past ``max_queue``) and a per-request callback
that receives :class:`Event`s from the engine thread. :meth:`Request.cancel` (a client gone)
frees the slot at the next step. Nothing here knows about HTTP.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.generate import Detokenizer, KVCache, Sampling, sample_next, utf8_ready
from llmcore.infer.slots import SlotCache
from llmcore.model.protocols import LanguageModel

log = logging.getLogger("llmcore.infer.engine")


class QueueFull(Exception):
    """More requests wait than the engine was told to hold."""


@dataclass
class Event:
    """``text`` is the new text since the last event; ``finish`` is set on the last one:
    ``stop`` (a stop token or string), ``length`` (max tokens or context), ``cancelled`` or
    ``error`` (then ``error`` says why)."""

    text: str
    tokens: int  # completion tokens so far
    finish: str | None = None
    error: str | None = None
    ids: list[int] | None = None  # on the last event: every token id of the completion


@dataclass
class Request:
    prompt: Sequence[int]
    sampling: Sampling
    on_event: Callable[[Event], None]
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class _Running:
    """A request in a slot: its tokens, its text and what has been sent."""

    def __init__(self, req: Request, tokenizer: LLMTokenizer, device: torch.device) -> None:
        self.req, self.detok = req, Detokenizer(tokenizer)
        self.ids: list[int] = []
        self.generator = None
        if req.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(req.sampling.seed)
        self.stops = set(req.stop_ids)
        self.hold = max((len(s) for s in req.stop_strings), default=0)

    def push(self, token: int, room: int) -> Event | None:
        """Take one sampled token; ``room`` is how many more the context can hold. Returns
        the event to send (None when nothing new is ready), with ``finish`` when done."""
        s = self.req.sampling
        if token in self.stops:
            return self._finish("stop", self.detok.text)
        self.ids.append(token)
        text = self.detok.push(token)
        sent = self.detok.sent
        for stop in self.req.stop_strings:
            at = text.find(stop, max(0, sent - len(stop)))
            if at >= 0:
                return self._finish("stop", text[:at])
        if len(self.ids) >= s.max_new_tokens or room <= 0:
            return self._finish("length", text)
        ready = utf8_ready(text)  # a multi-byte character that is not complete waits
        if self.hold:  # keep back a tail that could be the start of a stop string
            for cut in range(min(self.hold - 1, ready - sent), 0, -1):
                tail = text[ready - cut : ready]
                if any(st.startswith(tail) for st in self.req.stop_strings):
                    ready -= cut
                    break
        piece = self.detok.emit(text, ready)
        return Event(piece, len(self.ids)) if piece else None

    def _finish(self, reason: str, text: str) -> Event:
        piece = text[self.detok.sent :] if len(text) > self.detok.sent else ""
        self.detok.sent = len(text)
        return Event(piece, len(self.ids), finish=reason)


_ADMITTING: Any = object()  # a slot's placeholder between leaving the queue and its prefill


class Engine:
    """The decode loop; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, model: LanguageModel, tokenizer: LLMTokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, own_thread: bool = True,
                 compile: bool = False) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.max_len = max_len or model.cfg.max_seq_len
        prepare = getattr(model, "prepare_inference", None)
        if prepare is not None:  # fused projections, a RoPE table: fewer ops per step
            prepare(self.max_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = SlotCache(model, max_batch, self.max_len)
        self.slots: list[_Running | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.device = next(model.parameters()).device
        self.steps = 0
        # False: the caller runs :meth:`run` itself, e.g. in the main thread. On CPU that is
        # ~3x faster at batch 1: torch's OpenMP workers answer a main thread's team at once,
        # while a second thread's team pays a wake-up per op (measured, 2 cores)
        self.own_thread = own_thread
        self.forward: Callable[..., torch.Tensor] = model
        if compile:  # C++ kernels for the step: ~1.7x eager at batch 1 on CPU (measured);
            # the generated wrapper in C++ too: less Python per step
            self.forward = torch.compile(model, dynamic=True, options={"cpp_wrapper": True})

    # -- the caller's side ------------------------------------------------------------------
    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none); raises QueueFull when more than ``max_queue`` would
        wait for a slot."""
        for r in requests:
            if not r.prompt or len(r.prompt) + r.sampling.max_new_tokens > self.max_len:
                raise ValueError(f"prompt ({len(r.prompt)} tokens) + max_new_tokens "
                                 f"({r.sampling.max_new_tokens}) must be 1..{self.max_len}")
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self.slots)  # taken at the next step, no wait
            if len(self.waiting) + len(requests) - free > self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and "
                                f"{len(self.waiting)} waiting (the limits of this server: "
                                f"--max-batch {self.max_batch}, --max-queue {self.max_queue})"
                                "; retry later")
            self.waiting.extend(requests)
            self.cond.notify()
        self.start()

    def load(self) -> dict[str, int]:
        with self.cond:
            return {"running": sum(s is not None for s in self.slots),
                    "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    def start(self) -> None:
        with self.cond:
            if self.own_thread and self.thread is None and not self.stopping:
                self.thread = threading.Thread(target=self.run, name="llmcore-engine",
                                               daemon=True)
                self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and end the loop."""
        with self.cond:
            self.stopping = True
            for r in self.waiting:
                r.on_event(Event("", 0, finish="cancelled"))
            self.waiting.clear()
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------
    def warm_up(self) -> None:
        """Run a short request alone and two together, in this thread: with ``compile`` the
        graphs are built here (tens of seconds), not during the first users' requests."""
        prompt = [self.tok.im_start_id] * 3
        for n in (1, 2):
            for _ in range(n):
                self.submit(Request(prompt, Sampling(max_new_tokens=4), lambda e: None))
            self.run(until_idle=True)

    def run(self, until_idle: bool = False) -> None:
        """The loop: until :meth:`stop`, or with ``until_idle`` until nothing runs or waits."""
        with torch.no_grad():  # restored on return: the caller's thread may train afterwards
            self._loop(until_idle)

    def _loop(self, until_idle: bool) -> None:
        while True:
            with self.cond:
                if until_idle and not self.waiting and not any(self.slots):
                    break
                while not self.stopping and not self.waiting and not any(self.slots):
                    self.cond.wait(0.5)  # a timeout keeps a main thread open to signals
                if self.stopping:
                    break
                for r in [r for r in self.waiting if r.cancelled.is_set()]:
                    self.waiting.remove(r)  # a client gone while waiting frees its place
                    r.on_event(Event("", 0, finish="cancelled"))
                admitted = []
                for i, s in enumerate(self.slots):
                    if s is None and self.waiting:
                        admitted.append((i, self.waiting.popleft()))
                        self.slots[i] = _ADMITTING  # taken: counted as running from now
            if admitted:
                self._prefill_guarded(admitted)
            self._drop_cancelled()
            if any(self.slots):
                try:
                    self._step()
                except Exception as exc:  # a bug must not leave clients waiting forever
                    log.exception("decode step failed; ending every running request")
                    for i in range(self.max_batch):
                        self._end(i, Event("", 0, finish="error", error=repr(exc)[:200]))
        if self.stopping:
            for i in range(self.max_batch):
                self._end(i, Event("", 0, finish="cancelled"))

    def _prefill_guarded(self, admitted: list[tuple[int, Request]]) -> None:
        try:
            self._prefill(admitted)
        except Exception as exc:  # those not yet running end with the error
            log.exception("prefill failed")
            for i, req in admitted:
                if not isinstance(self.slots[i], _Running):
                    self.slots[i] = None
                    req.on_event(Event("", 0, finish="error", error=repr(exc)[:200]))

    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """Every request admitted at this step in one forward: the prompts right-padded to
        the longest (a row's padding comes after its tokens, so causal attention hides it
        from them), the head only at each prompt's last token. One forward instead of one
        per request: with many short requests, prefills were half the engine's time."""
        live = []
        for i, req in admitted:
            self.slots[i] = None
            if req.cancelled.is_set():
                req.on_event(Event("", 0, finish="cancelled"))
            else:
                live.append((i, req))
        if not live:
            return
        lengths = [len(req.prompt) for _, req in live]
        longest = max(lengths)
        ids = torch.tensor([list(req.prompt) + [0] * (longest - len(req.prompt))
                            for _, req in live], dtype=torch.long, device=self.device)
        keep = torch.arange(longest, device=self.device)[None, :] == torch.tensor(
            lengths, device=self.device)[:, None] - 1  # (n, T): each row's last token
        cache = KVCache.for_model(self.model, len(live), longest)
        # eager even with ``compile``: the step is what runs per token, and a compiled prefill
        # (other cache, shapes and ``keep``) recompiled until dynamo's limit turned the step
        # eager too (measured: the compiled engines then decoded at the eager rate)
        logits = self.model(ids, cache=cache, keep=keep)  # (n, V), in row order
        self.cache.fill([i for i, _ in live], cache, lengths)
        for row, (i, req) in enumerate(live):
            run = _Running(req, self.tok, self.device)
            self.slots[i] = run
            self._emit(i, run, sample_next(logits[row : row + 1], req.sampling, run.generator))

    def _step(self) -> None:
        n = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        live = [i for i in range(n) if self.slots[i] is not None]
        positions = self.cache.begin_step(n)
        tokens = torch.tensor([[s.ids[-1] if s is not None else 0] for s in self.slots[:n]],
                              device=self.device)  # (n, 1); a free slot's row is ignored
        logits = self.forward(tokens, cache=self.cache, positions=positions)[:, -1]
        for i in live:
            self.cache.lengths[i] += 1
        self.steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        for i in live:
            run = self.slots[i]
            assert run is not None
            s = run.req.sampling
            tok = greedy[i] if s.temperature == 0 else int(
                sample_next(logits[i : i + 1], s, run.generator)[0])
            self._emit(i, run, tok)

    def _emit(self, i: int, run: _Running, token: Any) -> None:
        room = self.max_len - self.cache.lengths[i] - 1
        event = run.push(int(token), room)
        if event is None:
            return
        if event.finish:
            self._end(i, event)
        else:
            run.req.on_event(event)

    def _drop_cancelled(self) -> None:
        for i, run in enumerate(self.slots):
            if run is not None and run.req.cancelled.is_set():
                self._end(i, Event("", len(run.ids), finish="cancelled"))

    def _end(self, i: int, event: Event) -> None:
        run = self.slots[i]
        self.slots[i] = None
        self.cache.lengths[i] = 0
        if run is not None:
            event.tokens, event.ids = event.tokens or len(run.ids), list(run.ids)
            run.req.on_event(event)


def complete(engine: Engine, prompt: Sequence[int], sampling: Sampling,
             stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
             timeout: float = 600.0) -> tuple[str, str, int]:
    """Blocking helper: (text, finish reason, completion tokens) of one request."""
    done = threading.Event()
    parts: list[str] = []
    last: list[Event] = []

    def on_event(e: Event) -> None:
        parts.append(e.text)
        if e.finish:
            last.append(e)
            done.set()

    engine.submit(Request(prompt, sampling, on_event, stop_ids, stop_strings))
    if not done.wait(timeout):
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    return "".join(parts), last[0].finish or "", last[0].tokens


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing runs or waits (for tests and shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        load = engine.load()
        if not load["running"] and not load["waiting"]:
            return True
        time.sleep(0.01)
    return False
