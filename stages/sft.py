"""DVC stage ``sft``: fine-tune the pretrained model on chat data, loss on assistant tokens.

Starts from ``data/models/pretrain/``; writes ``data/models/sft/`` and resumable checkpoints in
``data/checkpoints/sft/``.
"""

from __future__ import annotations

from safetensors.torch import load_file

from llmcore.checkpoint import read_model_config, sha256_file
from llmcore.tracking import register_model
from stages._common import (
    log,
    read_params,
    registry_bpb,
    relaunch_under_torchrun,
    repo_root,
    run_stage,
)
from stages._training import train_and_export

INIT = "data/models/pretrain"


def body(cfgs, tracker):
    root = repo_root()
    init = root / INIT
    model_cfg = read_model_config(init)
    weights = load_file(str(init / "model.safetensors"))
    metrics = train_and_export("sft", model_cfg, cfgs["sft"], cfgs["base"], "sft_train",
                               "sft_val", tracker, init_weights=weights,
                               extra_meta={"init_from": INIT,
                                           "init_sha256": sha256_file(init / "model.safetensors")})
    if metrics:  # rank 0: register the model with its bpb on all held-out SFT replies
        bpb = registry_bpb(root / "data/models/sft", root / "data/shards", cfgs["base"].device)
        metrics["sft/registry_bpb"] = round(bpb, 5)
        version = register_model(tracker, root / "data/models/sft", bpb, "sft")
        if version:
            log(f"sft: registered as llmcore version {version}")
    return metrics


def main() -> None:
    nproc = (read_params(repo_root()).get("sft") or {}).get("nproc_per_node", 1)
    relaunch_under_torchrun(nproc if isinstance(nproc, int) else 1, "stages.sft")
    run_stage("sft", ["base", "sft"], body)


if __name__ == "__main__":
    main()
