"""The registry's models as MLflow ``pyfunc`` models: prompts or chat messages in, replies out.

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/llmcore@best")
    model.predict(pd.DataFrame({"prompt": ["What is 12 + 7?"]}), params={"max_new_tokens": 16})
    mlflow models predict -m models:/llmcore@best -i in.json -t json --env-manager local
    mlflow models serve -m models:/llmcore@best -p 5001 --env-manager local

:func:`llmcore.tracking.register_model` saves each model directory with this module as the
flavour's ``loader_module`` (MLflow calls :func:`_load_pyfunc` with the directory), so no MLflow
class is subclassed here and the model directory travels inside the MLflow model unchanged.

Input: a DataFrame (or a list of dicts / strings) with a ``prompt`` column, each prompt a user
message put through the chat template, or a ``messages`` column of ChatML message lists
(``[{"role": "user", "content": ...}, ...]``). ``params``: ``max_new_tokens``, ``temperature``
(0 = greedy), ``top_p``, ``seed``, and ``raw`` (continue the prompt text as it is, for the
pretrained model). Output: a DataFrame with one ``completion`` per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0,
                                  "seed": 0, "raw": False}


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):  # pandas DataFrame
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):  # {"prompt": [...]} columns
        keys = list(model_input)
        values = [v if isinstance(v, list) else [v] for v in model_input.values()]
        return [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)]
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    return [r if isinstance(r, dict) else {"prompt": r} for r in model_input]


class LLMCorePyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: a model directory and its tokenizer."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        from llmcore.data.tokenizer import LLMTokenizer
        from llmcore.model.modeldir import load_model_dir

        self.model, _ = load_model_dir(Path(model_dir), device)
        self.tok = LLMTokenizer.load(Path(model_dir))

    def _prompt_ids(self, row: dict[str, Any], raw: bool) -> list[int]:
        from llmcore.data.tokenizer import render_chat

        messages = row.get("messages")
        if messages is not None and len(messages):
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
            return self.tok.encode(render_chat(msgs, add_generation_prompt=True))
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("each input row needs a 'prompt' string or a 'messages' list")
        text = prompt if raw else render_chat([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True)
        return self.tok.encode(text)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        from llmcore.infer.generate import Sampling, generate

        p = {**DEFAULT_PARAMS, **(params or {})}
        sampling = Sampling(max_new_tokens=int(p["max_new_tokens"]),
                            temperature=float(p["temperature"]),
                            top_p=float(p["top_p"]) if p["top_p"] < 1 else None,
                            seed=int(p["seed"]))
        prompts = [self._prompt_ids(r, bool(p["raw"])) for r in _rows(model_input)]
        limit = self.model.cfg.max_seq_len - sampling.max_new_tokens
        if any(len(ids) > limit for ids in prompts):
            raise ValueError(f"a prompt is longer than the model's {self.model.cfg.max_seq_len}"
                             f" tokens less max_new_tokens ({limit})")
        out = generate(self.model, prompts, sampling, [self.tok.im_end_id, self.tok.eot_id],
                       pad_id=self.tok.pad_id) if prompts else []
        return pd.DataFrame({"completion": [self.tok.decode(ids, skip_special_tokens=True)
                                            for ids in out]})


def _load_pyfunc(data_path: str) -> LLMCorePyfunc:
    """MLflow's entry point: ``data_path`` is the model directory inside the MLflow model."""
    return LLMCorePyfunc(Path(data_path))
