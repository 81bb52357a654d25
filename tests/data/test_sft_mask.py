"""Regression: the SFT loss sees assistant tokens only, end to end (pack -> loader -> loss)."""

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.data.packing import pack_all
from llmcore.data.shards import ShardDataset, ShardLoader
from llmcore.data.tasks import synthetic_conversations
from llmcore.model.transformer import Transformer


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, tiny_shards):
    _, tok = tiny_shards
    convs = [c.as_dicts() for c in synthetic_conversations(30, seed=1)]
    out = tmp_path_factory.mktemp("sft")
    pack_all(tok, {}, {"train": convs}, out, seq_len=192, sft_overflow="drop")
    return out, tok


from llmcore.model.loss import loss_sums  # noqa: E402


def test_repeated_train_conversations_are_spread_over_rows(tmp_path, tiny_shards):
    """The corpus stores conversations by content hash, so a question drawn twice lies next
    to its copy: packed in that order, rows would hold copies of one question."""
    _, tok = tiny_shards
    convs = sorted((c.as_dicts() for c in synthetic_conversations(40, seed=1)
                    if c.task == "arithmetic"), key=str)
    stored = [c for c in convs[:12] for _ in range(6)]  # each one six times, side by side
    pack_all(tok, {}, {"train": stored, "val": stored}, tmp_path, seq_len=192)
    most = {}
    for split in ("sft_train", "sft_val"):
        data = ShardDataset(tmp_path, split)
        most[split] = max(max(tok.decode([t for t in data[i][0].tolist() if t > 3]).count(
            q[-2]["content"]) for q in convs[:12]) for i in range(len(data)))
    # val keeps the stored order (the control: its rows do hold several copies)
    assert most["sft_train"] <= 2 < most["sft_val"], most


def test_user_tokens_never_reach_the_loss(sft_shards):
    shard_dir, tok = sft_shards
    batch = ShardLoader(ShardDataset(shard_dir, "sft_train"), 4, seed=0).next_batch()
    torch.manual_seed(0)
    model = Transformer(parse_model({"preset": "tiny", "vocab_size": 300})).eval()
    with torch.no_grad():
        logits = model(batch.input_ids)
    base, count = loss_sums(logits, batch.targets, batch.loss_mask)
    assert 0 < count < batch.loss_mask.numel()

    # find, in row 0, a target inside a user turn and one inside an assistant reply
    row = batch.targets[0].tolist()
    user_pos = assistant_pos = None
    for i, t in enumerate(row):
        turn = tok.decode(row[: i + 1]).rsplit("<|im_start|>", 1)
        if len(turn) < 2 or "\n" not in turn[1] or t <= 3:
            continue  # before any turn, still in a header, or a special token
        role, body = turn[1].split("\n", 1)
        if role == "user" and body.strip() and user_pos is None:
            user_pos = i
        if role == "assistant" and body.strip() and assistant_pos is None:
            assistant_pos = i
    assert user_pos is not None and assistant_pos is not None
    assert batch.loss_mask[0, user_pos] == 0 and batch.loss_mask[0, assistant_pos] == 1

    changed = batch.targets.clone()
    changed[0, user_pos] = (changed[0, user_pos] + 1) % 300
    assert torch.equal(loss_sums(logits, changed, batch.loss_mask)[0], base)

    changed = batch.targets.clone()
    changed[0, assistant_pos] = (changed[0, assistant_pos] + 1) % 300
    assert not torch.equal(loss_sums(logits, changed, batch.loss_mask)[0], base)


def test_every_assistant_reply_ends_with_a_trained_im_end(sft_shards):
    shard_dir, tok = sft_shards
    ds = ShardDataset(shard_dir, "sft_train")
    ids, mask = ds.gather(range(len(ds)))
    for r in range(len(ds)):
        trained = [int(t) for t, m in zip(ids[r], mask[r], strict=True) if m]
        assert trained and trained[-1] == tok.im_end_id
        # the user's words are never trained on
        text = tok.decode(trained)
        assert "What is" not in text and "Spell the word" not in text


def test_the_head_on_kept_positions_gives_the_full_loss_and_gradients(sft_shards):
    """Training runs the head only on the reply positions: the same loss, the same gradients."""
    shard_dir, _ = sft_shards
    batch = ShardLoader(ShardDataset(shard_dir, "sft_train"), 4, seed=0).next_batch()
    torch.manual_seed(0)
    model = Transformer(parse_model({"preset": "tiny", "vocab_size": 300}))
    keep = batch.loss_mask.bool()
    full, _ = loss_sums(model(batch.input_ids), batch.targets, batch.loss_mask)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch.input_ids, keep=keep)
    assert logits.shape == (int(keep.sum()), 300)
    kept, _ = loss_sums(logits, batch.targets[keep], batch.loss_mask[keep])
    kept.backward()
    torch.testing.assert_close(kept, full)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
