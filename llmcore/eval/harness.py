"""The evaluate stage's held-out examples as lm-evaluation-harness tasks.

``write_tasks`` writes a folder for ``lm_eval --include_path``: one JSONL file and one task
YAML per synthetic task (``llmcore_<task>``, greedy generation, exact match of the reply's
last line, as :func:`llmcore.data.tasks.is_correct` judges) and ``llmcore_doc_mc`` (the doc
questions as a multiple choice with the very candidates :func:`doc_mc_items` draws). Every
prompt is the chat template already rendered (``<|im_start|>user ... <|im_start|>assistant``),
so the harness needs no ``--apply_chat_template`` and sends exactly the ids the evaluate
stage sends.

Trade-offs: the harness scores a multiple choice by the summed log-probability of each
candidate (``acc``) or by it per character (``acc_norm``), the evaluate stage by the mean per
token; the three can pick differently, so only ``acc`` is compared against the same rule
computed here. The data files are named by absolute path (the harness reads ``data_files``
from the working directory), so the folder belongs to one checkout and is not committed.
The target is the documented answer's drawn position (:func:`doc_mc_items`), not always 0;
a tie still goes to the first of the tied candidates in the harness (``argmax``), where
:func:`summed_logprob_accuracy` gives it ``1/k`` credit, so the two agree only on questions
without ties (a trained model's summed log-probabilities practically never tie).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from llmcore.data.corpus import ConversationRow
from llmcore.data.tokenizer import EOT, IM_END, Chat, LLMTokenizer, render_chat
from llmcore.eval.evaluate import choice_credit, doc_mc_items, task_examples
from llmcore.model.protocols import LanguageModel

PREFIX = "llmcore_"
# the reply's last non-blank line, trimmed: what is_correct compares with the answer. Lines
# end where Python's str.splitlines ends them (not only at \n), and \s is str.isspace
LAST_LINE = r"(\S(?:[^\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]*\S)?)"


def prompt_text(conv: Chat) -> str:
    return render_chat(conv["messages"][:-1], add_generation_prompt=True)


def _data(path: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test"}


def write_tasks(out: Path, conversations: Sequence[ConversationRow], *, max_per_task: int,
                choices: int, max_new_tokens: int, seed: int = 0) -> list[str]:
    """Task YAMLs and JSONL data for every evaluation set in ``out``; their task names."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task, convs in task_examples(conversations, max_per_task).items():
        name = f"{PREFIX}{task}"
        rows: list[dict[str, Any]] = [{"prompt": prompt_text(c), "answer": c["answer"]}
                                      for c in convs]
        spec = {"task": name, **_data(out / f"{name}.jsonl", rows),
                "output_type": "generate_until", "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}", "target_delimiter": "",
                "generation_kwargs": {"until": [IM_END, EOT], "max_gen_toks": max_new_tokens,
                                      "do_sample": False},
                "filter_list": [{"name": "last_line", "filter": [
                    {"function": "regex", "regex_pattern": LAST_LINE, "group_select": -1,
                     "fallback": ""},
                    {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                 "higher_is_better": True}],
                "metadata": {"version": 1.0}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(name)
    items = doc_mc_items(conversations, choices, max_per_task, seed)
    if items:
        name = f"{PREFIX}doc_mc"
        # the candidates end with <|im_end|> as the evaluate stage scores them; the target
        # is the documented answer's index, drawn per question with ``seed``
        rows = [{"prompt": prompt_text(it.conv), "choices": [a + IM_END for a in it.candidates],
                 "label": it.gold} for it in items]
        spec = {"task": name, **_data(out / f"{name}.jsonl", rows),
                "output_type": "multiple_choice", "doc_to_text": "prompt",
                "doc_to_choice": "choices", "doc_to_target": "label",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean",
                                 "higher_is_better": True}],
                "metadata": {"version": 1.0}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(name)
    return names


def read_results(path: Path) -> dict[str, dict[str, float]]:
    """task -> metric -> value from a harness results JSON (``metric,filter`` keys flattened
    to ``metric``)."""
    data = json.loads(Path(path).read_text())
    out: dict[str, dict[str, float]] = {}
    for task, metrics in data.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, int | float) and "stderr" not in k and k != "alias"}
    return out


def results_file(output_dir: Path) -> Path:
    """The newest ``results_*.json`` the harness wrote under ``output_dir``."""
    found = sorted(Path(output_dir).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no results_*.json under {output_dir}: did lm_eval run?")
    return found[-1]


@torch.no_grad()
def summed_logprob_accuracy(model: LanguageModel, tok: LLMTokenizer,
                            conversations: Sequence[ConversationRow], choices: int,
                            max_questions: int, seed: int = 0) -> float:
    """The doc multiple choice by the harness's ``acc`` rule (the candidate with the largest
    summed log-probability), computed on an llmcore model: what ``acc`` must equal when no
    candidates tie. A tie of ``k`` with the documented answer earns ``1/k``
    (:func:`choice_credit`, as the evaluate stage), where the harness takes the first."""
    items = doc_mc_items(conversations, choices, max_questions, seed)
    credit = 0.0
    for item in items:
        prompt = tok.encode_prompt(item.conv["messages"][:-1])
        sums = []
        for a in item.candidates:
            ids = torch.tensor([prompt + tok.encode(a + IM_END)])
            logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]  # (T, V)
            cont = ids[0, len(prompt):]
            sums.append(float(logp[len(prompt) - 1:].gather(1, cont[:, None]).sum()))
        credit += choice_credit(sums, item.gold)
    return credit / len(items) if items else float("nan")
