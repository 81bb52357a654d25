"""DVC stage ``pretrain``: train the decoder on the pretraining shards.

Writes ``data/models/pretrain/`` and keeps resumable checkpoints in ``data/checkpoints/pretrain/``
(a persistent DVC output). ``pretrain.nproc_per_node > 1`` re-launches itself under torchrun.
"""

from __future__ import annotations

from stages._common import read_params, relaunch_under_torchrun, repo_root, run_stage
from stages._training import train_and_export


def body(cfgs, tracker):
    return train_and_export("pretrain", cfgs["model"], cfgs["pretrain"], cfgs["base"],
                            "pretrain_train", "pretrain_val", tracker)


def main() -> None:
    nproc = (read_params(repo_root()).get("pretrain") or {}).get("nproc_per_node", 1)
    relaunch_under_torchrun(nproc if isinstance(nproc, int) else 1, "stages.pretrain")
    run_stage("pretrain", ["base", "model", "pretrain"], body)


if __name__ == "__main__":
    main()
