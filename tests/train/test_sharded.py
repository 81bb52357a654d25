"""Sharded (DCP) checkpoints in one process: their layout, a corrupt shard skipped for the
checkpoint before it, exact resume, and the fingerprint that lets them change world size."""

import dataclasses
import json
import shutil

import torch

from llmcore.train.fit import run_fingerprint
from llmcore.train.sharded import DCP_DIR
from tests.train.test_train import CFG, run_fit

FSDP = dataclasses.replace(CFG, parallel="fsdp", optimizer="muon", keep_checkpoints=3)


def test_a_sharded_run_in_one_process_writes_dcp_checkpoints_and_resumes_exactly(
        tiny_shards, tmp_path):
    whole = run_fit(tiny_shards, tmp_path / "a", FSDP, checkpoint_dir=tmp_path / "a" / "ckpt")
    ckpt = tmp_path / "b" / "ckpt"
    run_fit(tiny_shards, tmp_path / "b", FSDP, checkpoint_dir=ckpt)
    folder = next(ckpt.iterdir())
    assert sorted(p.name for p in folder.glob("step-*")) == [
        "step-00000008", "step-00000016", "step-00000024"]
    newest = folder / "step-00000024"
    assert (newest / DCP_DIR / ".metadata").is_file()
    assert (newest / DCP_DIR / "__0_0.distcp").is_file() and (newest / "rng-00000.pt").is_file()
    sums = json.loads((newest / "checksums.json").read_text())
    assert {"state.json", f"{DCP_DIR}/.metadata", f"{DCP_DIR}/__0_0.distcp",
            "rng-00000.pt"} <= set(sums)
    # as if killed after step 16 with that checkpoint half written: resume takes step 8
    shutil.rmtree(newest)
    shard = folder / "step-00000016" / DCP_DIR / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    lines: list[str] = []
    resumed = run_fit(tiny_shards, tmp_path / "b", FSDP, checkpoint_dir=ckpt, log=lines.append)
    assert any("step-00000016 is unusable" in m and "checksum" in m for m in lines), lines
    assert resumed.result.resumed_from == 8
    assert [h["loss"] for h in resumed.result.history] == [
        h["loss"] for h in whole.result.history]
    assert all(torch.equal(resumed.export_weights[k], whole.export_weights[k])
               for k in whole.export_weights)


def test_the_fsdp_fingerprint_names_the_global_batch_not_the_world_size(tiny_shards, tmp_path):
    from llmcore.data.tokenizer import token_bytes
    from llmcore.train.fit import FitSpec
    from tests.train.test_train import MODEL

    shard_dir, tok = tiny_shards

    def fp(cfg, world: int, batch: int) -> str:
        spec = FitSpec(model=MODEL, train=dataclasses.replace(cfg, batch_size=batch),
                       shard_dir=shard_dir, train_split="pretrain_train", val_split=None,
                       token_bytes=tuple(token_bytes(tok)), checkpoint_dir=tmp_path)
        return run_fingerprint(spec, {"world_size": world, "data": {}})

    assert fp(FSDP, 2, 4) == fp(FSDP, 1, 8) == fp(FSDP, 4, 2)
    assert fp(FSDP, 2, 4) != fp(FSDP, 2, 8)  # another global batch: another run
    ddp = dataclasses.replace(FSDP, parallel="ddp")
    assert fp(ddp, 2, 4) != fp(ddp, 1, 8)  # DDP checkpoints hold one world size's state
    assert fp(ddp, 2, 4) != fp(FSDP, 2, 4)


def test_a_checkpoint_without_its_shards_is_refused(tiny_shards, tmp_path):
    from llmcore.train.sharded import ShardedCheckpoints

    short = dataclasses.replace(FSDP, max_steps=8, warmup_steps=2)
    run_fit(tiny_shards, tmp_path, short, checkpoint_dir=tmp_path / "ckpt")
    newest = next((tmp_path / "ckpt").iterdir()) / "step-00000008"
    manager = ShardedCheckpoints(tmp_path / "ckpt", "", log=lambda m: None)
    assert manager.verify(newest) is None
    sums = (newest / "checksums.json").read_text()
    # a checksums file that lists no shards (say, an unsharded checkpoint's)
    (newest / "checksums.json").write_text(json.dumps({"state.json": "x"}))
    assert "does not list a sharded checkpoint" in manager.verify(newest)
    (newest / "checksums.json").write_text(sums)
    (newest / DCP_DIR / ".metadata").unlink()
    assert manager.verify(newest) == f"{DCP_DIR}/.metadata is missing"
