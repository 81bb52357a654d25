import numpy as np
import pytest
import torch

from llmcore.data.packing import PackStats, pack_all, pretrain_rows, sft_rows
from llmcore.data.shards import ShardDataset, ShardLoader, read_manifest

CONVS = [
    [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    for i in range(30)
]


@pytest.fixture()
def packed(tiny_tokenizer, tmp_path):
    texts = [f"document {i}: " + "words and more words " * (i % 7 + 1) for i in range(60)]
    manifest = pack_all(tiny_tokenizer, {"train": texts[:50], "val": texts[50:]},
                        {"train": CONVS[:25], "val": CONVS[25:]}, tmp_path, seq_len=128,
                        rows_per_shard=7)
    return tmp_path, manifest, texts


def test_pretrain_rows_overlap_by_one_and_lose_only_the_tail():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    st = PackStats()
    rows = [r for block in pretrain_rows([docs[:1], docs[1:]], seq_len=4, eot_id=0, stats=st)
            for r in block]
    stream = [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0]
    assert [r.tolist() for r in rows] == [stream[0:5], stream[4:9]]
    assert st.tokens == 9 and st.source_tokens == 12 and st.cropped_tokens == 3
    # every transition of the kept stream is a target exactly once
    pairs = [(r[i], r[i + 1]) for r in rows for i in range(4)]
    assert pairs == list(zip(stream[:8], stream[1:9], strict=True))


def test_sft_rows_pad_truncate_drop():
    enc = [([1, 2, 3], [0, 1, 1]), ([1] * 10, [0] * 5 + [1] * 5), ([4, 5], [0, 0])]
    st = PackStats()
    rows = list(sft_rows(enc, seq_len=5, pad_id=3, overflow="truncate", stats=st))
    assert rows[0][0].tolist() == [1, 2, 3, 3, 3, 3] and rows[0][1].tolist() == [0, 1, 1, 0, 0, 0]
    assert rows[1][0].tolist() == [1] * 6 and rows[1][1].tolist() == [0] * 5 + [1]
    assert len(rows) == 2 and st.truncated_rows == 1 and st.dropped_rows == 1
    st = PackStats()
    rows = list(sft_rows(enc, seq_len=5, pad_id=3, overflow="drop", stats=st))
    assert len(rows) == 1 and st.dropped_rows == 2


def test_sft_packing_keeps_conversations_whole():
    enc = [([1, 2], [0, 1]), ([4, 5, 6], [0, 1, 1]), ([7, 8], [0, 1]), ([9] * 9, [0] + [1] * 8)]
    st = PackStats()
    rows = list(sft_rows(enc, seq_len=5, pad_id=3, overflow="truncate", stats=st, packed=True))
    assert [r.tolist() for r, _, _ in rows] == [[1, 2, 4, 5, 6, 3], [7, 8, 3, 3, 3, 3], [9] * 6]
    assert [m.tolist() for _, m, _ in rows] == [[0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0],
                                                [0] + [1] * 5]
    # each conversation of a row is its own document; the padding after them one more
    assert [g.tolist() for _, _, g in rows] == [[0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1],
                                                [0] * 6]
    assert st.conversations == 4 and st.rows == 3 and st.truncated_rows == 1
    assert st.padded_tokens == 1 + 4 and st.tokens == 5 + 2 + 6


def test_sft_packing_fills_an_earlier_row_first_and_writes_the_fullest_when_all_are_open(
        monkeypatch):
    enc = [([1, 2, 3, 4], [0, 1, 1, 1]), ([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1]),
           ([10, 11, 12, 13, 14], [0, 1, 1, 1, 1]), ([15, 16], [0, 1])]
    st = PackStats()
    rows = list(sft_rows(enc, seq_len=5, pad_id=0, overflow="truncate", stats=st, packed=True))
    # [8, 9] goes back to the first row (next fit would have put it after [5, 6, 7]) and
    # [15, 16] joins [5, 6, 7]: 3 rows, 2 pad tokens, where next fit writes 4 rows and 8
    assert [r.tolist() for r, _, _ in rows] == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 15, 16, 0],
                                                [10, 11, 12, 13, 14, 0]]
    assert [g.tolist() for _, _, g in rows][0] == [0, 0, 0, 0, 1, 1]
    assert st.rows == 3 and st.padded_tokens == 2
    # with two open rows, the third conversation that fits neither writes the fullest first
    monkeypatch.setattr("llmcore.data.packing.OPEN_ROWS", 2)
    enc = [([1, 2, 3, 4], [0, 1, 1, 1]), ([5, 6, 7], [0, 1, 1]),
           ([8, 9, 10, 11], [0, 1, 1, 1]), ([12, 13], [0, 1])]
    rows = list(sft_rows(enc, seq_len=5, pad_id=0, overflow="truncate", stats=PackStats(),
                         packed=True))
    assert [r.tolist() for r, _, _ in rows] == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 12, 13, 0],
                                                [8, 9, 10, 11, 0, 0]]


def test_shard_layout_and_manifest(packed, tiny_tokenizer):
    out, manifest, _ = packed
    m = read_manifest(out)
    # the file is the returned manifest less its timing (a timing would change DVC's hash)
    assert m == {k: v for k, v in manifest.items() if k != "seconds"}
    assert "seconds" in manifest and m["dtype"] == "uint16" and m["row_len"] == 129
    assert m["tokenizer_sha256"] == tiny_tokenizer.sha256()
    train = m["splits"]["pretrain_train"]
    assert len(train["shards"]) == -(-train["rows"] // 7)
    assert all((out / s["file"]).is_file() for s in train["shards"])
    ds = ShardDataset(out, "pretrain_train")
    assert len(ds) == train["rows"] and ds[0][0].dtype == np.uint16 and ds[0][1] is None
    # rows are the token stream: consecutive rows share one token
    assert ds[0][0][-1] == ds[1][0][0]
    # a row view reads the mapped file without a copy
    assert ds[3][0].dtype == np.uint16 and np.shares_memory(ds[3][0], ds._ids[0])


def test_sft_shards_carry_the_mask(packed, tiny_tokenizer):
    out, _, _ = packed
    ds = ShardDataset(out, "sft_train")
    assert ds.has_loss_mask and 0 < len(ds) < 25  # packed: several conversations a row
    ids, mask = ds[4]
    text = "".join(tiny_tokenizer.decode([i]) for i, k in zip(ids, mask, strict=True) if k)
    assert text.startswith("answer ") and text.endswith("<|im_end|>")
    assert text.count("<|im_end|>") >= 2 and "question" not in text


def test_loader_is_deterministic_and_covers_an_epoch(packed):
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_train")
    a, b = ShardLoader(ds, 2, seed=7), ShardLoader(ds, 2, seed=7)
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids)
    seen = np.concatenate([a.indices(0, s) for s in range(a.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == a.steps_per_epoch * 2
    other = ShardLoader(ds, 2, seed=8)
    assert not np.array_equal(other._permutation(0), a._permutation(0))
    assert not np.array_equal(a._permutation(0), a._permutation(1))


def test_batch_targets_are_shifted_inputs(packed):
    out, _, _ = packed
    batch = ShardLoader(ShardDataset(out, "pretrain_train"), 3, seed=1).next_batch()
    assert batch.input_ids.shape == (3, 128) and batch.input_ids.dtype == torch.int64
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert torch.all(batch.loss_mask == 1)
    sft = ShardLoader(ShardDataset(out, "sft_train"), 4, seed=1).next_batch()
    assert 0 < sft.loss_mask.sum() < sft.loss_mask.numel()


def test_loader_resumes_exactly(packed):
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_train")
    full = ShardLoader(ds, 2, seed=3)
    reference = [full.next_batch().input_ids for _ in range(12)]  # crosses an epoch boundary
    first = ShardLoader(ds, 2, seed=3)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    resumed = ShardLoader(ds, 2, seed=3)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch().input_ids for _ in range(7)]
    assert all(torch.equal(x, y) for x, y in zip(rest, reference[5:], strict=True))
    with pytest.raises(ValueError, match=r"global batch of 2 rows \(2 x 1 ranks\)"):
        ShardLoader(ds, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        ShardLoader(ds, 2, seed=4).load_state_dict(state)


def test_loader_resumes_at_another_world_size_with_the_same_global_batch(packed):
    """A sharded checkpoint written by 2 ranks x 2 rows resumes in 1 process x 4 rows (and
    back): the global batches that follow are the same rows."""
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_train")
    one = ShardLoader(ds, 4, seed=3)
    reference = [one.next_batch().input_ids for _ in range(9)]
    two = [ShardLoader(ds, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        for _ in range(4):
            loader.next_batch()
    resumed = ShardLoader(ds, 4, seed=3)
    resumed.load_state_dict(two[0].state_dict())
    assert all(torch.equal(resumed.next_batch().input_ids, ref) for ref in reference[4:])
    back = [ShardLoader(ds, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in back:
        loader.load_state_dict(resumed.state_dict())
    joined = torch.cat([loader.next_batch().input_ids for loader in back])
    assert torch.equal(joined, one.next_batch().input_ids)


def test_ranks_split_each_global_batch(packed):
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_train")
    single = ShardLoader(ds, 4, seed=5)
    ranks = [ShardLoader(ds, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next_batch().input_ids
        parts = torch.cat([r.next_batch().input_ids for r in ranks])
        assert torch.equal(whole, parts)


def test_too_few_rows_is_a_clear_error(packed):
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_val")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardLoader(ds, len(ds) + 1)


def test_manifest_mismatch_is_detected(packed):
    out, _, _ = packed
    import json
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["pretrain_train"]["shards"][0]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest says 8; run `dvc repro pack`"):
        ShardDataset(out, "pretrain_train")


def test_segments_of_pretraining_and_sft_rows(packed, tiny_tokenizer):
    out, _, _ = packed
    ds = ShardDataset(out, "pretrain_train")
    ids, _ = ds.gather([0, 1])
    seg = ds.segments([0, 1], ids)
    eot = tiny_tokenizer.eot_id
    # a document starts at each <|endoftext|>: the number changes exactly there
    assert ((np.diff(seg, axis=1) == 1) == (ids[:, 1:] == eot)).all()
    sft = ShardDataset(out, "sft_train")
    ids, mask = sft.gather([0])
    seg = sft.segments([0], ids)[0]
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert len(starts) >= 2  # packed: several conversations in the row
    # every conversation starts with <|im_start|>, where its document starts
    assert all(ids[0][i] == tiny_tokenizer.im_start_id for i in starts[:-1])
    batch = ShardLoader(sft, 2, seed=0).next_batch()
    assert batch.segments.shape == batch.input_ids.shape


def test_chat_mix_puts_that_share_of_conversations_in_the_pretraining_train_stream(
        tiny_tokenizer, tmp_path):
    texts = [f"document {i}: " + "words and more words " * 5 for i in range(40)]
    convs = [[{"role": "user", "content": f"question {i}"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(400)]
    im_start = tiny_tokenizer.tok.token_to_id("<|im_start|>")

    def pack(share, out):
        m = pack_all(tiny_tokenizer, {"train": texts[:30], "val": texts[30:]},
                     {"train": convs, "val": convs[:5]}, out, seq_len=64, chat_share=share)
        rows = m["splits"]["pretrain_train"]["rows"]
        return m, ShardDataset(out, "pretrain_train").gather(range(rows))[0]

    plain, plain_rows = pack(0.0, tmp_path / "plain")
    mixed, mixed_rows = pack(0.5, tmp_path / "mixed")
    st = mixed["splits"]["pretrain_train"]
    assert plain["splits"]["pretrain_train"]["chat_tokens"] == 0
    assert (plain_rows == im_start).sum() == 0
    # half the stream is conversations: one <|im_start|> per message, whole conversations only
    assert abs(st["chat_tokens"] / st["source_tokens"] - 0.5) < 0.05
    stream = np.concatenate([mixed_rows[:, :-1].ravel(), mixed_rows[-1, -1:]])
    starts = int((stream == im_start).sum())
    # (the tail cropped off the stream, < one row, can hold a few conversations' starts)
    assert 2 * st["chat_conversations"] - 64 // 6 <= starts <= 2 * st["chat_conversations"]
    assert 0 < st["chat_conversations"] < len(convs)
    assert st["doc_tokens"] == plain["splits"]["pretrain_train"]["doc_tokens"]
    # the validation split stays documents only, identical with and without the mix
    assert read_manifest(tmp_path / "mixed")["splits"]["pretrain_val"]["shards"][0]["sha256"] == \
        read_manifest(tmp_path / "plain")["splits"]["pretrain_val"]["shards"][0]["sha256"]
    # the draw is fixed: packing again gives the same rows
    _, again = pack(0.5, tmp_path / "again")
    assert np.array_equal(again, mixed_rows)


def test_packing_twice_writes_identical_files(tiny_tokenizer, tmp_path):
    """DVC hashes the shard directory: a re-run must not look like new data."""
    texts = [f"document {i}: " + "words " * (i % 9 + 1) for i in range(30)]
    for out in ("a", "b"):
        pack_all(tiny_tokenizer, {"train": texts, "val": texts[:3]},
                 {"train": CONVS[:20], "val": CONVS[20:]}, tmp_path / out, seq_len=32,
                 chat_share=0.3)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
