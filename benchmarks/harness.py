"""lm-evaluation-harness on the Hugging Face export, against the evaluate stage's numbers.

    python benchmarks/harness.py [--model rl] [--batch-size 16]      (make harness)

Writes the evaluate stage's held-out examples as local harness tasks
(``llmcore/report/harness.py``) into ``build/lm_eval/tasks``, exports the model with
``llmcore export`` into ``build/lm_eval/hf-<model>``, runs ``lm_eval --model hf`` on it offline
and compares, task by task, with ``metrics/evaluate.json``: exact match on generated replies
(the same examples, greedy, the reply's last line), and for the doc questions the harness's
``acc`` (summed log-probability) against the same rule computed here on the llmcore model,
beside the stage's own mean-per-token accuracy. Writes reports/harness.json.

Needs the default run's outputs (``dvc repro evaluate``) and lm-eval (``make setup``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore import metric_keys as keys  # noqa: E402
from llmcore.data.corpus import read_conversations  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer  # noqa: E402
from llmcore.eval.harness import (  # noqa: E402
    read_results,
    results_file,
    summed_logprob_accuracy,
    write_tasks,
)
from llmcore.export.hf import export_hf  # noqa: E402
from llmcore.model.modeldir import load_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="rl", choices=["pretrain", "sft", "dpo", "rl"],
                    help="which model of the default run (default rl, the last)")
    ap.add_argument("--batch-size", type=int, default=16, help="the harness's batch size")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "harness.json")
    args = ap.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]
    model_dir = REPO / "data" / "models" / args.model
    metrics = json.loads((REPO / "metrics" / "evaluate.json").read_text())
    convs = read_conversations(REPO / "data" / "corpus", "test")  # what the evaluate stage scores
    build = REPO / "build" / "lm_eval"
    names = write_tasks(build / "tasks", convs, max_per_task=params["max_task_examples"],
                        choices=params["choices"], max_new_tokens=params["max_new_tokens"])
    hf = export_hf(model_dir, build / f"hf-{args.model}")
    start = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf",
           "--model_args", f"pretrained={hf},dtype=float32", "--device", "cpu",
           "--include_path", str(build / "tasks"), "--tasks", *names,
           "--batch_size", str(args.batch_size), "--output_path", str(build / "out")]
    print("harness:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1",
                                         "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    got = read_results(results_file(build / "out"))
    rows = []
    for name in names:
        task = name.removeprefix("llmcore_")
        if task == "doc_mc":
            model, _ = load_model_dir(model_dir, "cpu")
            ours = summed_logprob_accuracy(model.eval(), LLMTokenizer.load(model_dir), convs,
                                           params["choices"], params["max_task_examples"])
            rows.append({"task": "doc_mc (acc: summed log-prob)", "harness": got[name]["acc"],
                         "llmcore": ours, "stage_mean_per_token": metrics.get(
                             keys.model_metric(args.model, "doc_mc_accuracy")), "harness_acc_norm": got[name]["acc_norm"]})
        else:
            rows.append({"task": task, "harness": got[name]["exact_match"],
                         "llmcore": metrics.get(keys.model_metric(args.model, keys.exact_match(task)))})
    result = {"model": args.model, "lm_eval_seconds": round(seconds, 1), "tasks": rows,
              "command": " ".join(cmd)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| task | lm-eval | llmcore | difference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['harness']:.3f} | {r['llmcore']:.3f} | "
              f"{r['harness'] - r['llmcore']:+.3f} |")
    print(f"\nwrote {args.out} ({seconds:.0f} s in lm_eval)")


if __name__ == "__main__":
    main()
