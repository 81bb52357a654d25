"""Run llmcore.train.fit.fit under torchrun and dump the loss history (used by test_ddp.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/train/ddp_fit.py SHARDS OUT.json BATCH
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llmcore.data.tokenizer import LLMTokenizer, token_bytes  # noqa: E402
from llmcore.train.fit import FitSpec, fit  # noqa: E402
from tests.train.test_train import CFG, MODEL  # noqa: E402


def main() -> None:
    shard_dir, out, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    import dataclasses

    cfg = dataclasses.replace(CFG, batch_size=batch, max_steps=12, eval_every=100,
                              checkpoint_every=100, threads=1)
    tok = LLMTokenizer.load(shard_dir / "tok")
    spec = FitSpec(model=MODEL, train=cfg, seed=1, device="cpu", dtype="float32",
                   shard_dir=shard_dir, train_split="pretrain_train", val_split=None,
                   token_bytes=tuple(token_bytes(tok)), checkpoint_dir=out.parent / f"ckpt-{batch}")
    result = fit(spec, log=lambda m: None)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        out.write_text(json.dumps([h["loss"] for h in result.result.history]))


if __name__ == "__main__":
    main()
