"""What Prefect adds on top of plain ``dvc repro``, on the same tiny pipeline.

Clones the repository twice into a temporary folder, sets the tiny test params, and times
(1) ``dvc repro`` in one clone and (2) the ``llm-pipeline`` flow run in-process
(``python -m pipeline.flow run``) in the other; then both again with nothing to do. Prints JSON.

    python benchmarks/flow_overhead.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "fetch": {"max_documents": 80, "synthetic_per_task": 20, "doc_questions": False},
    "tokenizer": {"vocab_size": 400},
    "pack": {"seq_len": 32, "rows_per_shard": 64},
    "model": {"preset": "tiny"},
    "pretrain": {"max_steps": 100, "batch_size": 8, "warmup_steps": 10, "eval_every": 50,
                 "eval_batches": 2, "checkpoint_every": 50},
    "sft": {"max_steps": 30, "batch_size": 8, "warmup_steps": 5, "eval_every": 10,
            "eval_batches": 2, "checkpoint_every": 10},
    "evaluate": {"max_task_examples": 6, "max_new_tokens": 8, "max_rows": 16},
    "quantize": {"agreement_prompts": 4, "agreement_tokens": 8, "decode_tokens": 8},
}


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = env_()
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=dest, env=env, check=True)
    return dest


def env_() -> dict[str, str]:
    env = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b",
               GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PREFECT_API_URL", None)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    a, b = clone(work / "dvc"), clone(work / "flow")
    env = env_()
    flow_env = dict(env, PREFECT_HOME=str(work / "prefect"),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    flow_cmd = [sys.executable, "-m", "pipeline.flow", "run"]
    result = {
        "dvc_repro_seconds": round(timed(["dvc", "repro"], a, env), 2),
        "flow_run_seconds": round(timed(flow_cmd, b, flow_env), 2),
        "dvc_repro_noop_seconds": round(timed(["dvc", "repro"], a, env), 2),
        "flow_run_noop_seconds": round(timed(flow_cmd, b, flow_env), 2),
    }
    result["flow_overhead_seconds"] = round(result["flow_run_seconds"]
                                            - result["dvc_repro_seconds"], 2)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
