import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from fastapi.testclient import TestClient

from llmcore.config import parse_section
from llmcore.generate import Sampling, generate
from llmcore.model import Transformer
from llmcore.modeldir import save_model_dir, state_dict_for_save
from llmcore.serve import create_app
from llmcore.tokenizer import render_chat
from tests.conftest import project_env


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve")
    tiny_tokenizer.save(root / "tok")
    torch.manual_seed(0)
    cfg = parse_section("model", {"preset": "tiny", "vocab_size": 300, "max_seq_len": 64,
                                  "positions": "learned"})
    model = Transformer(cfg).eval()
    save_model_dir(root / "m", cfg, state_dict_for_save(model), root / "tok", {}, {})
    return root / "m", model, TestClient(create_app(root / "m", "cpu"))


def expected(model, tok, prompts, n):
    ids = [tok.encode(render_chat([{"role": "user", "content": p}], add_generation_prompt=True))
           for p in prompts]
    outs = generate(model, ids, Sampling(max_new_tokens=n), [tok.im_end_id, tok.eot_id])
    return [tok.decode(o) for o in outs]


def test_health(served):
    _, model, client = served
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["params"] == model.num_parameters()


def test_batched_generate_matches_the_library(served, tiny_tokenizer):
    _, model, client = served
    prompts = ["hello", "a much longer prompt than the first one"]
    r = client.post("/v1/generate", json={"prompt": prompts, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["completions"]]
    assert texts == expected(model, tiny_tokenizer, prompts, 6)
    assert all(c["finish_reason"] in ("stop", "length") for c in r.json()["completions"])


def test_chat_completion_and_stream_agree(served, tiny_tokenizer):
    _, model, client = served
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content == expected(model, tiny_tokenizer, ["hi there"], 8)[0]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(ln[6:])["choices"][0]["delta"]["content"] for ln in lines[:-1]]
    assert "".join(pieces) == content


@pytest.mark.parametrize("body,status,fragment", [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, 422, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     400, "last message"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 400, "reads at most"),
])
def test_bad_requests_name_the_problem(served, body, status, fragment):
    _, _, client = served
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status and fragment in r.text, r.text


def test_real_server_on_loopback(served):
    path, _, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmcore.cli", "serve", str(path), "--port",
                             str(port), "--device", "cpu"], env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    assert json.loads(resp.read())["status"] == "ok"
                    break
            except OSError:
                assert time.time() < deadline, "server did not start"
                time.sleep(0.3)
        req = urllib.request.Request(url + "/v1/generate", method="POST",
                                     data=json.dumps({"prompt": "hi", "max_new_tokens": 3})
                                     .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert len(json.loads(resp.read())["completions"]) == 1
    finally:
        proc.terminate()
        proc.wait(10)
