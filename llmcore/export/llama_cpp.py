"""Run an exported GGUF file in a real llama.cpp (through ``llama-cpp-python``), to check it.

``llama-cpp-python`` has no prebuilt wheel for this platform: ``make llama-cpp`` builds one
from source (several minutes on two cores) into ``~/.cache/llmcore/wheels`` and ``make setup``
installs a wheel found there. :func:`available` says why it cannot be used when it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_cpp import Llama


def available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return False, (f"llama-cpp-python is not installed ({exc}); `make llama-cpp` builds it "
                       "from source into ~/.cache/llmcore/wheels and installs it")
    return True, ""


def load(path: Path, n_ctx: int = 512, vocab_only: bool = False) -> Llama:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, vocab_only=vocab_only,
                 logits_all=True, verbose=False)  # scores are kept only with logits_all


def tokenize(llm: Llama, text: str) -> list[int]:
    """Ids for plain text: no BOS, special-token strings not parsed (as llmcore's encode)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def greedy(llm: Llama, prompt: Sequence[int], max_new_tokens: int,
           stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation, one token at a time from llama.cpp's own logits."""
    import numpy as np

    llm.reset()
    llm.eval(list(prompt))
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in stop_ids:
            break
        out.append(tok)
        llm.eval([tok])
    return out
