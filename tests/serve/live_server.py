"""A real ``llmcore serve`` process on 127.0.0.1 and a random free port, for the tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from llmcore.config.model import parse_model
from llmcore.model.modeldir import save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer
from tests.conftest import project_env


def never_stopping_model(root: Path, tok, max_seq_len: int = 2048, positions: str = "rope"):
    """A tiny random model whose stop tokens score exactly 0 while every reply token's score
    is positive somewhere: greedy replies run to max_tokens, so lengths are predictable."""
    torch.manual_seed(0)
    cfg = parse_model({"preset": "tiny", "vocab_size": tok.vocab_size,
                                  "max_seq_len": max_seq_len, "positions": positions})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for i in (tok.im_end_id, tok.eot_id):
            model.lm_head.weight[i] = 0.0
    tok.save(root / "tok")
    save_model_dir(root / "m", cfg, state_dict_for_save(model), root / "tok", {}, {})
    return root / "m", model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


class LiveServer:
    def __init__(self, model: str | Path, *args: str, env: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmcore.cli", "serve", str(model), "--port", str(self.port),
             "--device", "cpu", *args], env=env or project_env(), cwd=cwd,
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(time.time() + 120)
        except BaseException:  # never leave the process behind, whatever went wrong
            self.stop()
            raise

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                if get_json(self.url + "/health")["status"] == "ok":
                    return
            except (OSError, ValueError):  # not listening yet, or not answering JSON yet
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                self.proc.wait(5)
                raise RuntimeError(f"llmcore serve did not start (exit {self.proc.poll()}):\n"
                                   + self.output()[-3000:])
            time.sleep(0.2)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def wait_idle(self, timeout: float = 10.0) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate (then kill) the process if it still runs; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.log.closed:
            self.log.close()
