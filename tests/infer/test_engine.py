"""Continuous batching: batched requests produce what each would alone."""

import threading
import time

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.data.tokenizer import render_chat
from llmcore.infer.engine import Engine, Event, QueueFull, Request, complete, wait_idle
from llmcore.infer.generate import Sampling, generate
from llmcore.model.transformer import Transformer


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    torch.manual_seed(0)
    cfg = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 192,
                                  "positions": request.param, "n_kv_heads": 2})
    return Transformer(cfg).eval()


def prompts(tok, n):
    texts = ["hello", "a much longer prompt than the first one, with words", "x",
             "def add(a, b):", "the quick brown fox", "1 2 3 4 5 6 7", "zz top", "one more"]
    return [tok.encode(render_chat([{"role": "user", "content": texts[i % len(texts)] * (1 + i // 8)}],
                                   add_generation_prompt=True)) for i in range(n)]


def alone(model, tok, prompt, sampling):
    out = generate(model, [prompt], sampling, [tok.im_end_id, tok.eot_id])[0]
    return tok.decode(out)


def run_concurrently(engine, jobs):
    """Submit (prompt, sampling) jobs at staggered times; return their (text, finish)."""
    results: list = [None] * len(jobs)

    def worker(i, prompt, sampling):
        time.sleep(0.003 * i)  # arrive while others are mid-reply: joins the running batch
        text, finish, _ = complete(engine, prompt, sampling, [engine.tok.im_end_id,
                                                              engine.tok.eot_id])
        results[i] = (text, finish)

    threads = [threading.Thread(target=worker, args=(i, p, s), daemon=True)
               for i, (p, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request got no answer within 120 s"
    return results


def test_batched_equals_alone_greedy_and_seeded(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_batch=4, max_queue=32)
    try:
        jobs = []
        for i, p in enumerate(prompts(tiny_tokenizer, 10)):
            s = (Sampling(max_new_tokens=5 + 3 * i) if i % 2 == 0 else
                 Sampling(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=i))
            jobs.append((p, s))
        got = run_concurrently(engine, jobs)
        for (p, s), (text, finish) in zip(jobs, got, strict=True):
            assert text == alone(model, tiny_tokenizer, p, s)
            assert finish in ("stop", "length")
        assert engine.steps < sum(s.max_new_tokens for _, s in jobs)  # steps were shared
    finally:
        engine.stop()


def test_stop_strings_cut_the_text_and_end_the_request(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_batch=2)
    try:
        p = prompts(tiny_tokenizer, 1)[0]
        full = alone(model, tiny_tokenizer, p, Sampling(max_new_tokens=30))
        assert len(full) > 6
        stop = full[3:5]
        text, finish, _ = complete(engine, p, Sampling(max_new_tokens=30), stop_strings=[stop])
        assert finish == "stop" and text == full[: full.index(stop)]
    finally:
        engine.stop()


def test_queue_bound_and_cancel_free_the_slot(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_batch=1, max_queue=1)
    events: list[Event] = []
    p = prompts(tiny_tokenizer, 1)[0]
    long = Sampling(max_new_tokens=192 - len(p))
    try:
        first = Request(p, long, events.append)
        engine.submit(first)
        deadline = time.time() + 10
        while engine.load()["running"] == 0:
            assert time.time() < deadline
            time.sleep(0.001)
        engine.submit(Request(p, long, lambda e: None))  # waits: the only slot is busy
        with pytest.raises(QueueFull):
            engine.submit(Request(p, long, lambda e: None))
        first.cancel()
        assert wait_idle(engine, 60)
        assert events[-1].finish == "cancelled"
        assert complete(engine, p, Sampling(max_new_tokens=3))[1] in ("stop", "length")
    finally:
        engine.stop()


def test_requests_past_the_context_are_refused(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    try:
        with pytest.raises(ValueError, match="must be 1..192"):
            engine.submit(Request([1] * 190, Sampling(max_new_tokens=7), lambda e: None))
    finally:
        engine.stop()


def test_a_request_joins_while_another_is_decoding(model, tiny_tokenizer):
    """Continuous batching: B, submitted while A holds a slot, is prefilled and finishes
    while A is still decoding (a static batch would start B only after A's last token),
    and both produce what they produce alone."""
    tok = tiny_tokenizer
    p_a, p_b = prompts(tok, 2)
    # no stop tokens: A runs its full length, so it is certainly still decoding when B comes
    s_a, s_b = Sampling(max_new_tokens=60), Sampling(max_new_tokens=8)
    log: list[tuple[str, Event]] = []  # every event of both, in the order the engine sent them
    done = {"a": threading.Event(), "b": threading.Event()}
    engine = Engine(model, tok, max_batch=2, max_queue=4)

    def sink(name: str):
        def on_event(e: Event) -> None:
            log.append((name, e))
            if name == "a" and len(log) == 1:  # A's first token is out: A holds its slot
                engine.submit(Request(p_b, s_b, sink("b")))
            if e.finish:
                done[name].set()
        return on_event

    try:
        engine.submit(Request(p_a, s_a, sink("a")))
        assert done["a"].wait(60) and done["b"].wait(60), log
        order = [name for name, _ in log]
        a_end = next(k for k, (n, e) in enumerate(log) if n == "a" and e.finish)
        b_end = next(k for k, (n, e) in enumerate(log) if n == "b" and e.finish)
        assert order[0] == "a" and order.index("b") < a_end  # B started before A ended
        assert b_end < a_end and "a" in order[order.index("b"):b_end]  # interleaved
        # every decode step of B was also one of A's (one after the other: A's 59 + B's 7)
        assert engine.steps <= s_a.max_new_tokens, engine.steps
        for name, p, s in (("a", p_a, s_a), ("b", p_b, s_b)):
            last = next(e for n, e in log if n == name and e.finish)
            assert last.finish == "length" and last.ids == generate(model, [p], s)[0]
            assert "".join(e.text for n, e in log if n == name) == tok.decode(last.ids)
    finally:
        engine.stop()


@pytest.mark.slow  # torch.compile: tens of seconds of graph building
def test_compiled_engine_gives_the_eager_tokens(tiny_tokenizer):
    """torch.compile of the step (dynamic shapes: any batch, any cache span) changes speed,
    not answers; the engine runs in the caller's thread here, as under `llmcore serve`."""
    torch.manual_seed(0)
    cfg = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 128})
    model = Transformer(cfg).eval()
    engine = Engine(model, tiny_tokenizer, max_batch=4, own_thread=False, compile=True)
    stops = [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id]
    jobs = [(p, Sampling(max_new_tokens=6 + i)) for i, p in enumerate(prompts(tiny_tokenizer, 3))]
    got: list = [None] * len(jobs)
    together: dict[int, str] = {}
    errors: list[BaseException] = []

    def client():
        try:
            for i, (p, s) in enumerate(jobs):  # one at a time: batch 1
                got[i] = complete(engine, p, s, stops, timeout=120)[0]
            # two at once: a batch of 2 through the compiled step
            both = [threading.Event(), threading.Event()]
            parts: list[list[str]] = [[], []]

            def sink(k):
                def on_event(e):
                    parts[k].append(e.text)
                    if e.finish:
                        together[k] = "".join(parts[k])
                        both[k].set()
                return on_event

            engine.submit(*(Request(p, s, sink(k), stops) for k, (p, s) in enumerate(jobs[1:])))
            for ev in both:
                assert ev.wait(120), "no answer from the compiled engine at batch 2"
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.stop(0)  # ends engine.run() below whatever happened here

    from torch._dynamo.utils import counters

    counters.clear()
    try:
        engine.warm_up()
        t = threading.Thread(target=client, daemon=True)
        t.start()
        engine.run()
        t.join(60)
        assert not t.is_alive()
    finally:
        engine.stop(0)
    if errors:
        raise errors[0]
    expected = [alone(model, tiny_tokenizer, p, s) for p, s in jobs]
    assert got == expected
    assert [together[0], together[1]] == expected[1:]
    # only the step is compiled (prefills run eager): a few graphs, none broken; compiling
    # the prefill too recompiled per cache kind, shape and `keep` up to dynamo's limit
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_reply_text_is_decoded_step_by_step_as_decoding_every_id_would(tiny_tokenizer):
    """The engine decodes only the tokens after the last complete character each step; the
    text sent must still equal one decode of the whole reply, multi-byte characters split
    across tokens included."""
    from llmcore.infer.engine import _Running

    text = "naïve café: 12 + 7 = 19 ✓ 🙂🙂 done"
    ids = tiny_tokenizer.encode_text(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # bytes: characters span several tokens
    run = _Running(Request([1], Sampling(max_new_tokens=1000), lambda e: None,
                           stop_ids=[tiny_tokenizer.im_end_id]), tiny_tokenizer,
                   torch.device("cpu"))
    events = [run.push(t, room=1000) for t in ids]
    assert None in events  # a part of a character was held back
    last = run.push(tiny_tokenizer.im_end_id, room=1000)
    assert last is not None and last.finish == "stop"
    pieces = [e.text for e in events if e is not None] + [last.text]
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text


def test_requests_admitted_together_share_one_prefill_and_answer_as_alone(model, tiny_tokenizer):
    """Prompts of different lengths, right-padded into one forward: each request's tokens
    are still those it gets alone (greedy and seeded sampling)."""
    engine = Engine(model, tiny_tokenizer, max_batch=8, max_queue=8, own_thread=False)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    jobs = [(p, Sampling(max_new_tokens=12, temperature=0.0 if i % 2 else 0.9, seed=i))
            for i, p in enumerate(prompts(tiny_tokenizer, 6))]
    assert len({len(p) for p, _ in jobs}) > 2  # the padding is really exercised
    texts: dict[int, list[str]] = {i: [] for i in range(len(jobs))}
    for i, (p, s) in enumerate(jobs):
        engine.submit(Request(p, s, lambda e, i=i: texts[i].append(e.text),
                              (tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id)))
    try:
        engine.run(until_idle=True)
    finally:
        hook.remove()
    prefills = [c for c in calls if c[1] > 1]
    assert prefills == [(6, max(len(p) for p, _ in jobs))]  # one forward for all six
    for i, (p, s) in enumerate(jobs):
        assert "".join(texts[i]) == alone(model, tiny_tokenizer, p, s), f"request {i}"
