"""The engine-to-loop bridge: every event arrives, in order, in few wake-ups."""

from __future__ import annotations

import asyncio
import threading

from llmcore.infer.engine import Event
from llmcore.serve.events import Inbox, mailbox


def test_a_burst_from_another_thread_arrives_whole_in_order_in_one_delivery() -> None:
    async def main() -> tuple[list[tuple[int, str]], int]:
        inboxes = [Inbox() for _ in range(4)]
        sinks = [(b, b.sink(k)) for b in inboxes for k in range(2)]
        box = mailbox()
        assert all(b.box is box for b in inboxes)  # one mailbox per loop

        def engine_step(step: int) -> None:  # what the engine thread does for one step
            for _, sink in sinks:
                sink(Event(f"{step}", step))

        # the loop is busy (this coroutine holds it) while the thread posts a whole step
        t = threading.Thread(target=engine_step, args=(0,))
        t.start()
        t.join()
        assert box.deliveries == 0 and len(box.queue) == 8
        await asyncio.sleep(0)  # the loop runs the one delivery scheduled
        await asyncio.sleep(0)
        assert box.deliveries == 1 and not box.queue
        for step in range(1, 50):  # many steps while the loop keeps running: none lost
            engine_step(step)
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        got = [(k, e.text) for b in inboxes for k, e in b.items]
        return got, box.deliveries

    got, deliveries = asyncio.run(main())
    for k in range(2):  # per job, every step's event, in order
        texts = [t for j, t in got if j == k]
        assert texts == [str(s) for s in range(50)] * 4
    assert deliveries <= 50  # one per step at most, however many requests


def test_a_wait_with_a_timeout_keeps_what_arrived_after_it() -> None:
    async def main() -> list[str]:
        inbox = Inbox()
        await inbox.wait(0.01)  # nothing yet: returns on the timeout
        threading.Thread(target=inbox.sink(0), args=(Event("late", 1, finish="stop"),)).start()
        for _ in range(100):
            await inbox.wait(0.05)
            if inbox.items:
                break
        return [e.text for _, e in inbox.items]

    assert asyncio.run(main()) == ["late"]


def test_pieces_merge_a_choices_text_and_keep_finishes_after_it() -> None:
    from llmcore.serve.events import Piece, pieces

    batch = [(0, Event("he", 1)), (1, Event("x", 1)), (0, Event("llo", 2)),
             (1, Event("y", 2, finish="stop")), (0, Event("!", 3))]
    out, failed = pieces(batch, lambda k: k + 10)  # job k streams as choice k + 10
    assert not failed
    assert out == [Piece(11, "xy", None), Piece(11, None, "stop"), Piece(10, "hello!", None)]
    assert "".join(p.text or "" for p in out if p.choice == 10) == "hello!"


def test_pieces_stop_at_a_failure_with_the_text_before_it() -> None:
    from llmcore.serve.events import Piece, pieces

    batch = [(0, Event("ab", 1)), (0, Event("", 1, finish="error", error="boom")),
             (0, Event("never", 2))]
    out, failed = pieces(batch, lambda k: k)
    assert failed and out == [Piece(0, "ab", None)]
