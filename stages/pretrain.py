"""DVC stage ``pretrain``: train the decoder on the pretraining shards.

Writes ``data/models/pretrain/`` and keeps resumable checkpoints in ``data/checkpoints/pretrain/``
(a persistent DVC output). ``pretrain.nproc_per_node > 1`` re-launches itself under torchrun.
"""

from __future__ import annotations

from llmcore.tracking import register_model
from stages import paths
from stages._common import log, model_tags, relaunch_under_torchrun, repo_root, run_stage
from stages._training import train_and_export

PARAMS = ("base.seed", "base.device", "base.dtype", "model", "pretrain")


def body(cfgs, tracker):
    metrics = train_and_export("pretrain", cfgs["model"], cfgs["pretrain"], cfgs["base"],
                               ("pretrain_train", "pretrain_val"), tracker)
    if metrics:  # rank 0: its own registry name, as docs bpb and SFT-reply bpb do not compare
        root = repo_root()
        version = register_model(tracker, root / paths.model_dir("pretrain"),
                                 metrics["pretrain/val_bpb"], "pretrain", "llmcore-pretrain",
                                 tags=model_tags(root, "pretrain", cfgs))
        if version:
            log(f"pretrain: registered as llmcore-pretrain version {version}")
    return metrics


def main() -> None:
    relaunch_under_torchrun("pretrain", "stages.pretrain")
    run_stage("pretrain", PARAMS, body)


if __name__ == "__main__":
    main()
