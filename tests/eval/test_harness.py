"""lm-evaluation-harness on the Hugging Face export reads the evaluate stage's examples and
scores them as the stage does: the same exact match per example on generated replies, and
the multiple choice's ``acc`` equal to the summed log-probability rule computed here; the
task files carry the drawn candidates and answer position, and ties earn chance."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.data.tasks import final_answer
from llmcore.data.tokenizer import IM_END
from llmcore.eval.evaluate import doc_mc_items, task_accuracy
from llmcore.eval.harness import (
    read_results,
    results_file,
    summed_logprob_accuracy,
    write_tasks,
)
from llmcore.export.hf import export_hf
from llmcore.infer.generate import Sampling, generate
from llmcore.model.modeldir import save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer
from tests.eval.test_evaluate import BiasLM

pytestmark = pytest.mark.slow  # lm_eval and transformers in a subprocess


def conv(task, q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "task": task, "answer": a}


@torch.no_grad()
def test_the_harness_scores_the_export_as_the_evaluate_stage_does(tmp_path, tiny_tokenizer):
    lm_eval = Path(sys.executable).parent / "lm_eval"
    if not lm_eval.is_file():
        pytest.skip("lm-evaluation-harness is not installed (make setup installs it)")
    tok = tiny_tokenizer
    tok.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": tok.vocab_size})
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    for p in model.parameters():  # large random weights: varied replies, no near-ties
        if p.dim() > 1:
            p.normal_(0, 0.5)
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {"eos_token_id": [tok.im_end_id, tok.eot_id], "pad_token_id": tok.pad_id})
    # a random model's answers are its own greedy replies' last lines: every other question
    # gets that as its answer (right) or something else (wrong), so both scorers have right
    # and wrong examples to agree on. Replies with a control token are not used as right
    # answers: the harness decodes with special tokens skipped
    special = {tok.im_start_id, tok.im_end_id, tok.eot_id, tok.pad_id}
    convs = []
    for i in range(12):
        q = f"What is {i} + {i + 3}?"
        prompt = tok.encode_prompt([{"role": "user", "content": q}])
        reply = generate(model, [prompt], Sampling(max_new_tokens=8),
                         [tok.im_end_id, tok.eot_id], pad_id=tok.pad_id)[0]
        own = final_answer(tok.decode(reply).strip())
        clean = own and not special & set(reply)
        convs.append(conv("arithmetic", q, own if clean and i % 2 == 0 else "no such answer"))
    answers = ["Use a list.", "Call len() on it.", "A tuple is immutable.", "Import it first.",
               "It joins paths.", "It reads JSON."]
    convs += [conv("doc", f"Question {i}?", a) for i, a in enumerate(answers)]
    ours = task_accuracy(model, tok, convs, max_per_task=20, max_new_tokens=8, batch_size=1)
    assert 0 < ours["arithmetic"]["exact_match"] < 1

    names = write_tasks(tmp_path / "tasks", convs, max_per_task=20, choices=4,
                        max_new_tokens=8)
    assert names == ["llmcore_arithmetic", "llmcore_doc_mc"]
    hf = export_hf(tmp_path / "m", tmp_path / "hf")
    out = subprocess.run(
        [str(lm_eval), "run",
         "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32", "--device", "cpu",
         "--include_path", str(tmp_path / "tasks"), "--tasks", *names, "--batch_size", "1",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = read_results(results_file(tmp_path / "out"))
    samples = sorted((tmp_path / "out").rglob("samples_llmcore_arithmetic_*.jsonl"))
    assert got["llmcore_arithmetic"]["exact_match"] == ours["arithmetic"]["exact_match"]
    per_example = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    per_example.sort(key=lambda s: s["doc_id"])
    assert [bool(s["exact_match"]) for s in per_example] == ours["arithmetic"]["correct"]

    # the multiple choice: the harness's acc is the argmax of the summed log-probabilities
    ours_mc = summed_logprob_accuracy(model, tok, convs, 4, 20)
    assert math.isclose(got["llmcore_doc_mc"]["acc"], ours_mc)
    assert len(doc_mc_items(convs, 4, 20)) == 6


def test_the_doc_mc_task_file_targets_the_drawn_answer_position(tmp_path):
    convs = [conv("doc", f"Question {i}?", f"Answer number {i}.") for i in range(40)]
    names = write_tasks(tmp_path, convs, max_per_task=30, choices=4, max_new_tokens=8, seed=7)
    assert names == ["llmcore_doc_mc"]
    rows = [json.loads(line) for line in (tmp_path / "llmcore_doc_mc.jsonl").read_text()
            .splitlines()]
    items = doc_mc_items(convs, 4, 30, seed=7)
    assert [r["label"] for r in rows] == [it.gold for it in items]
    assert [r["choices"] for r in rows] == [[a + IM_END for a in it.candidates] for it in items]
    assert all(r["choices"][r["label"]] == c["answer"] + IM_END for r, c in zip(rows, convs[:30], strict=True))
    assert {r["label"] for r in rows} == {0, 1, 2, 3}  # not always the first


def test_summed_logprob_accuracy_gives_a_tie_chance_credit(tiny_tokenizer):
    tok = tiny_tokenizer
    # one-letter answers: every candidate is one token and <|im_end|>, so a uniform model's
    # summed log-probabilities are all equal; answers repeat, distractors never do
    letters = "abcde"
    convs = [conv("doc", f"Question {i}?", letters[i % 5]) for i in range(200)]
    assert {len(tok.encode(a + IM_END)) for a in letters} == {2}
    uniform = BiasLM(torch.zeros(tok.vocab_size))
    assert summed_logprob_accuracy(uniform, tok, convs, 4, 200) == 0.25  # was 1.0
    # a model that prefers "a" to the other letters, which it cannot tell apart: full credit
    # where "a" is the answer, none where "a" is a distractor, 1/4 where it is not offered
    prefer_a = BiasLM(torch.zeros(tok.vocab_size).index_fill(0, torch.tensor(
        tok.encode("a")), 5.0))
    items = doc_mc_items(convs, 4, 200, seed=1)
    want = [1.0 if it.conv["answer"] == "a" else 0.0 if "a" in it.candidates else 0.25
            for it in items]
    assert 0 < want.count(0.25) < want.count(0.0)
    assert summed_logprob_accuracy(prefer_a, tok, convs, 4, 200, seed=1) == sum(want) / 200
