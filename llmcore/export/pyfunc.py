"""The registry's models as MLflow ``pyfunc`` models: prompts or chat messages in, replies out.

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/llmcore@best")
    model.predict(pd.DataFrame({"prompt": ["What is 12 + 7?"]}), params={"max_new_tokens": 16})
    mlflow models predict -m models:/llmcore@best -i in.json -t json --env-manager local
    mlflow models serve -m models:/llmcore@best -p 5001 --env-manager local

:func:`llmcore.tracking.register_model` saves each model directory with this module as the
flavour's ``loader_module`` (MLflow calls :func:`_load_pyfunc` with the directory), so no MLflow
class is subclassed here and the model directory travels inside the MLflow model unchanged.

Input, one completion per prompt, in any of these shapes (the MLflow model declares no input
schema, so that MLflow hands each of them over as it is; ``mlflow models predict`` turns JSON
lists into numpy arrays, which read the same):

* a string, or a list of strings: each a user message put through the chat template;
* a message list (``[{"role": "user", "content": ...}, ...]``, one conversation), or a list
  of message lists;
* ``{"prompt": str | [str, ...]}`` or ``{"messages": conversation | [conversation, ...]}``;
* a DataFrame (or a list of dicts) with a ``prompt`` or a ``messages`` column.

Anything else is an MLflow error that lists these shapes, never an empty answer. ``params``:
``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``, and ``raw`` (continue the
prompt text as it is, for the pretrained model). Output: a DataFrame with one ``completion``
per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0,
                                  "seed": 0, "raw": False}


SHAPES = ("a string; a list of strings; a message list [{'role': ..., 'content': ...}] or a "
          "list of them; {'prompt': str or [str]}; {'messages': a message list or a list of "
          "them}; a DataFrame or list of dicts with a 'prompt' or 'messages' column")


class BadInput(ValueError):
    """Input in none of the accepted shapes (raised to MLflow as an MlflowException)."""


def _plain(value: Any) -> Any:
    """numpy arrays (what MLflow's JSON parsing makes of lists) as Python lists and strings."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value and "content" in value


def _is_conversation(value: Any) -> bool:
    value = _plain(value)
    return isinstance(value, list) and bool(value) and all(_is_message(m) for m in value)


def _row(value: Any, where: str) -> dict[str, Any]:
    """One prompt: ``{"prompt": str}`` or ``{"messages": [message, ...]}``."""
    value = _plain(value)
    if isinstance(value, str):
        return {"prompt": value}
    if _is_conversation(value):
        return {"messages": value}
    if isinstance(value, dict):
        messages, prompt = _plain(value.get("messages")), _plain(value.get("prompt"))
        if _is_conversation(messages):
            return {"messages": messages}
        if isinstance(prompt, str):
            return {"prompt": prompt}
    raise BadInput(f"{where} is neither a prompt string nor a message list")


def requests(model_input: Any) -> list[dict[str, Any]]:
    """The prompts of ``model_input``, each ``{"prompt": str}`` or ``{"messages": [...]}``,
    or :class:`BadInput` naming the accepted shapes."""
    try:
        return _requests(model_input)
    except BadInput as exc:
        raise BadInput(f"{exc}; the input may be {SHAPES}") from None


def _requests(model_input: Any) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame: one prompt per row
        rows = model_input.to_dict(orient="records")
        return [_row(r, f"row {i}") for i, r in enumerate(rows)]
    value = _plain(model_input)
    if isinstance(value, str) or _is_conversation(value):
        return [_row(value, "the input")]
    if isinstance(value, dict) and not _is_message(value):
        columns = [k for k in ("prompt", "messages") if k in value]
        if len(columns) != 1:
            raise BadInput(f"a dict input needs one key, 'prompt' or 'messages' (got "
                           f"{sorted(map(str, value))})")
        key, items = columns[0], _plain(value[columns[0]])
        if isinstance(items, str) or (key == "messages" and _is_conversation(items)):
            items = [items]
        if not isinstance(items, list):
            raise BadInput(f"{key!r} must be a {'string' if key == 'prompt' else 'message list'}"
                           " or a list of them")
        return [_row({key: item}, f"{key}[{i}]") for i, item in enumerate(items)]
    if isinstance(value, list):
        return [_row(item, f"input[{i}]") for i, item in enumerate(value)]
    raise BadInput(f"the input is a {type(model_input).__name__}")


def _mlflow_error(exc: Exception) -> Exception:
    """``exc`` as MLflow's own error (its scoring server answers it with a 400)."""
    try:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
    except ImportError:  # used without MLflow
        return exc
    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


class LLMCorePyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: a model directory and its tokenizer."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        from llmcore.data.tokenizer import LLMTokenizer
        from llmcore.model.modeldir import load_model_dir

        self.model, _ = load_model_dir(Path(model_dir), device)
        prepare = getattr(self.model, "prepare_inference", None)
        if prepare is not None:  # generation only: fused projections, a RoPE table
            prepare()
        self.tok = LLMTokenizer.load(Path(model_dir))

    def _prompt_ids(self, row: dict[str, Any], raw: bool, where: str) -> list[int]:
        from llmcore.data.corpus import check_encodable

        if "messages" in row:
            check_encodable(row["messages"], f"{where} messages")
        else:
            check_encodable(row["prompt"], where)
        if "messages" in row:
            msgs = [{"role": str(m["role"]), "content": str(m["content"])}
                    for m in row["messages"]]
            # contents are text: a "<|im_end|>" typed in a message cannot forge a turn
            return self.tok.encode_prompt(msgs)
        if raw:
            return self.tok.encode_text(row["prompt"])
        return self.tok.encode_prompt([{"role": "user", "content": row["prompt"]}])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        try:
            return self._predict(model_input, params)
        except ValueError as exc:  # BadInput, text UTF-8 cannot encode, a too long prompt
            raise _mlflow_error(exc) from None

    def _predict(self, model_input: Any, params: dict[str, Any] | None) -> Any:
        import pandas as pd

        from llmcore.infer.generate import Sampling, generate

        p = {**DEFAULT_PARAMS, **(params or {})}
        sampling = Sampling(max_new_tokens=int(p["max_new_tokens"]),
                            temperature=float(p["temperature"]),
                            top_p=float(p["top_p"]) if p["top_p"] < 1 else None,
                            seed=int(p["seed"]))
        prompts = [self._prompt_ids(r, bool(p["raw"]), f"prompt {i}")
                   for i, r in enumerate(requests(model_input))]
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
