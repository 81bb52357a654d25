"""DVC stage ``pretrain``: train the decoder on the pretraining shards.

Writes ``data/models/pretrain/`` and keeps resumable checkpoints in ``data/checkpoints/pretrain/``
(a persistent DVC output). ``pretrain.nproc_per_node > 1`` re-launches itself under torchrun.
"""

from __future__ import annotations

from stages._common import relaunch_under_torchrun, run_stage
from stages._training import train_and_export

PARAMS = ("base.seed", "base.device", "base.dtype", "model", "pretrain")


def body(cfgs, tracker):
    return train_and_export("pretrain", cfgs["model"], cfgs["pretrain"], cfgs["base"],
                            ("pretrain_train", "pretrain_val"), tracker)


def main() -> None:
    relaunch_under_torchrun("pretrain", "stages.pretrain")
    run_stage("pretrain", PARAMS, body)


if __name__ == "__main__":
    main()
