"""From the engine thread to the requests' coroutines: the engine's events, delivered in bursts.

The engine calls each request's callback from its own thread, once per token. Handing every
event to the event loop on its own (``call_soon_threadsafe`` per event) costs a wake-up of the
loop, a write to its self-pipe, per token per request: at 32 streaming requests that is 32
system calls per decode step, paid on the engine's thread. Here the events of a step go into
one :class:`Mailbox` per loop, which schedules a single delivery for everything posted until
the loop runs it; each request's :class:`Inbox` then holds every event that arrived, and
:func:`events` yields them as one batch, which :func:`pieces` turns into one piece of text per
choice, so a stream writes once per wake-up rather than once per token (``app._stream``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import NamedTuple

from starlette.requests import Request

from llmcore.infer.engine import Event
from llmcore.infer.engine import Request as EngineRequest


class Mailbox:
    """Events posted from any thread, delivered to their inboxes in the loop's thread.

    ``scheduled`` is set by the poster that finds no delivery pending and cleared by the
    delivery before it empties the queue: an event posted while a delivery runs is either
    taken by it or finds ``scheduled`` clear and schedules the next one, so none waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: collections.deque[tuple[Inbox, int, Event]] = collections.deque()
        self.scheduled = False
        self.deliveries = 0  # how many wake-ups carried the events (tests read it)

    def post(self, inbox: Inbox, k: int, event: Event) -> None:
        self.queue.append((inbox, k, event))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop closed (server shutting down): nobody listens
                self.scheduled = False

    def _deliver(self) -> None:
        self.scheduled = False
        self.deliveries += 1
        while self.queue:
            inbox, k, event = self.queue.popleft()
            inbox.items.append((k, event))
            inbox.flag.set()


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary())


def mailbox() -> Mailbox:
    """The running loop's mailbox (made on first use)."""
    loop = asyncio.get_running_loop()
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Inbox:
    """One HTTP request's events, as (index of its job, Event): a deque the mailbox fills in
    the loop's thread and a flag the coroutine waits on. Waiting with a timeout cannot lose
    an event: they stay in the deque."""

    def __init__(self) -> None:
        self.box = mailbox()
        self.items: collections.deque[tuple[int, Event]] = collections.deque()
        self.flag = asyncio.Event()

    def sink(self, k: int) -> Callable[[Event], None]:
        """The engine-side callback of job ``k``."""
        post, box = self.box.post, self
        return lambda event: post(box, k, event)

    async def wait(self, timeout: float) -> None:
        if not self.items:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flag.wait(), timeout)
        self.flag.clear()


async def events(request: Request, inbox: Inbox, reqs: Sequence[EngineRequest]
                 ) -> AsyncGenerator[list[tuple[int, Event]], None]:
    """The engine's events until every request finished, each batch all that had arrived.
    Looks for a client disconnect every half second even while tokens flow, and cancels the
    requests when the client went away or the consumer stopped early (the ``finally``),
    which frees their slots."""
    left = len(reqs)
    next_check = time.monotonic() + 0.5
    try:
        while left:
            await inbox.wait(max(0.01, next_check - time.monotonic()))
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    return
                next_check = time.monotonic() + 0.5
            if inbox.items:
                batch = list(inbox.items)
                inbox.items.clear()
                left -= sum(1 for _, e in batch if e.finish)
                yield batch
    finally:
        for r in reqs:
            r.cancel()


class Piece(NamedTuple):
    """What one streamed chunk carries: a choice's new text, or its finish reason."""

    choice: int
    text: str | None
    finish: str | None


def pieces(batch: Sequence[tuple[int, Event]], choice_of: Callable[[int], int]
           ) -> tuple[list[Piece], bool]:
    """A batch of events as the chunks to write: each choice's text merged into one piece
    (the text of several steps when the client fell behind), and a finish after its last
    text. The bool says the batch ended a request with ``cancelled`` or ``error``: the pieces
    stop there, the text before it included."""
    out: list[Piece] = []
    pending: dict[int, str] = {}
    for k, event in batch:
        index = choice_of(k)
        if event.text:
            pending[index] = pending.get(index, "") + event.text
        if event.finish in ("cancelled", "error"):
            out.extend(Piece(i, text, None) for i, text in pending.items())
            return out, True
        if event.finish:
            if index in pending:
                out.append(Piece(index, pending.pop(index), None))
            out.append(Piece(index, None, event.finish))
    out.extend(Piece(i, text, None) for i, text in pending.items())
    return out, False
