"""A real ``llmcore serve`` process driven by the official ``openai`` client: compatibility,
a full queue, a client that disconnects mid-stream, SIGTERM with a stream open."""

import re
import threading
import time

import httpx
import pytest

from llmcore.infer.generate import Sampling, generate
from tests.conftest import project_env
from tests.serve.live_server import LiveServer, get_json, never_stopping_model

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency "
                             "(pip install -e '.[dev]')")

LONG = 1900  # tokens: a tiny model takes seconds, long enough to be caught mid-reply


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("live")
    path, model = never_stopping_model(root, tiny_tokenizer)
    # two slots and no waiting room: a third concurrent request is a 429 at once
    srv = LiveServer(path, "--max-batch", "2", "--max-queue", "0")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        yield srv, client, model
    finally:
        srv.stop()


def greedy(model, tok, messages, n):
    ids = tok.encode_prompt(messages)
    out = generate(model, [ids], Sampling(max_new_tokens=n), [tok.im_end_id, tok.eot_id])[0]
    return tok.decode(out), len(ids)


def test_openai_client_chat_completions_and_models(server, tiny_tokenizer):
    srv, client, model = server
    assert [m.id for m in client.models.list()] == ["m"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected, n_prompt = greedy(model, tiny_tokenizer, messages, 10)
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "length"
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", r.id) and r.created > 0 and r.model == "m"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 10)

    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and all(c.model == "m" for c in chunks)
    # one id for every chunk of a completion (the usage chunk too), a new one per completion
    stream_ids = {c.id for c in chunks}
    assert len(stream_ids) == 1, stream_ids
    stream_id = stream_ids.pop()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", stream_id) and stream_id != r.id

    two = client.chat.completions.create(model="m", messages=messages, max_tokens=4, n=2,
                                         temperature=0.8, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_openai_client_completions(server, tiny_tokenizer):
    srv, client, model = server
    ids = tiny_tokenizer.encode_text("The list type")
    out = generate(model, [ids], Sampling(max_new_tokens=6), [tiny_tokenizer.im_end_id])[0]
    r = client.completions.create(model="m", prompt="The list type", max_tokens=6,
                                  temperature=0)
    assert r.choices[0].text == tiny_tokenizer.decode(out)
    assert re.fullmatch(r"cmpl-[0-9a-f]{24}", r.id)
    chunks = list(client.completions.create(model="m", prompt="The list type", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and re.fullmatch(r"cmpl-[0-9a-f]{24}", ids.pop()), ids


def test_openai_client_gets_clear_errors(server):
    _, client, _ = server
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="serves 'm'"):
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "hi"}])


def test_full_queue_is_429_at_once_and_disconnect_frees_the_slots(server):
    srv, client, _ = server
    # n=2 fills both slots; the client reads one chunk and goes away
    stream = client.chat.completions.create(model="m", messages=[{"role": "user",
                                            "content": "go on"}], max_tokens=LONG, n=2,
                                            temperature=0, stream=True)
    next(iter(stream))
    deadline = time.time() + 10
    while srv.health()["running"] < 2:  # both prefilled and decoding
        assert time.time() < deadline, srv.health()
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError, match="max-queue 0"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2)
    assert time.monotonic() - start < 2.0
    stream.close()  # what `for chunk in stream: break` then close() does
    assert srv.wait_idle(10), srv.health()
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_non_streaming_disconnect_frees_the_slot(server):
    srv, _, _ = server
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": LONG,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.5)
    assert srv.wait_idle(10), srv.health()


def test_sigterm_stops_the_server_with_a_stream_open(tmp_path, tiny_tokenizer):
    path, _ = never_stopping_model(tmp_path, tiny_tokenizer)
    with LiveServer(path) as srv:  # stopped on the way out, whatever the test did
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        got: list = []

        def read():
            try:
                for c in client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "go"}],
                        max_tokens=LONG, stream=True):
                    got.append(c)
            except Exception as exc:  # the stream ends with the server: any end is fine here
                got.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.time() + 20
        while not got:
            assert time.time() < deadline
            time.sleep(0.05)
        assert not isinstance(got[0], Exception), got[0]  # the stream was open
        start = time.monotonic()
        srv.proc.terminate()
        srv.proc.wait(15)
        assert time.monotonic() - start < 10
        reader.join(10)
        assert not reader.is_alive()


def test_the_openai_client_needs_the_servers_api_key(tmp_path, tiny_tokenizer):
    path, _ = never_stopping_model(tmp_path, tiny_tokenizer, max_seq_len=64)
    env = {**project_env(), "LLMCORE_API_KEY": "from-the-env"}
    srv = LiveServer(path, env=env)
    try:
        def client(key):
            return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0,
                                 timeout=30)
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError, match="not this server's"):
            client("wrong").chat.completions.create(model="m", messages=msgs, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client("wrong").models.list()
        reply = client("from-the-env").chat.completions.create(model="m", messages=msgs,
                                                                max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason == "length"  # greedy never picks a stop token
        assert get_json(srv.url + "/health")["api_key_required"] is True
    finally:
        srv.stop()
