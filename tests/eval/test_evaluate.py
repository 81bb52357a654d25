"""Evaluation with rigged models whose right answers are known: task exact match and
``<|im_end|>`` rate, doc multiple choice (its items, tie credit and candidate scores), bits
per byte at 1x/2x/4x context and on a split, and the flat summary metrics."""

import math
from types import SimpleNamespace

import pytest
import torch

from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import IM_END, render_chat, token_bytes
from llmcore.eval.evaluate import (
    _mean_logprob,
    bpb_at_contexts,
    by_pieces,
    choice_credit,
    doc_mc_items,
    doc_multiple_choice,
    drawn_samples,
    normalise_answer,
    split_bpb,
    summary_metrics,
    task_accuracy,
    task_metrics,
    wilson_interval,
)

LN2 = math.log(2.0)


class ScriptedLM(torch.nn.Module):
    """After a known prompt, the next token is that prompt's script, one token per position
    (then ``after``); after an unknown prefix every token is equally likely.

    Honours what callers use of a model: ``model(ids, cache=, positions=) -> (B, T, V)``, a
    ``cfg``, parameters (device and dtype) and the KV cache protocol of
    :func:`llmcore.infer.generate.generate` (the left-padded prefill, ``cache.advance``): each
    cached row's tokens so far are kept on the cache object."""

    def __init__(self, vocab: int, scripts: dict[tuple[int, ...], list[int]], after: int,
                 max_seq_len: int = 512) -> None:
        super().__init__()
        self.vocab, self.scripts, self.after = vocab, scripts, after
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=1, positions="rope",
                                   max_seq_len=max_seq_len, doc_mask=False)

    def next_token(self, prefix: list[int]) -> int | None:
        for prompt, script in self.scripts.items():
            if len(prefix) >= len(prompt) and tuple(prefix[: len(prompt)]) == prompt:
                k = len(prefix) - len(prompt)
                return script[k] if k < len(script) else self.after
        return None

    def forward(self, ids, cache=None, positions=None, segments=None):
        B, T = ids.shape
        rows = ids.tolist()
        if cache is not None:
            if cache.offset == 0:  # the prefill: drop the left padding
                real = (cache.key_padding[:, :T].tolist() if cache.key_padding is not None
                        else [[True] * T] * B)
                cache.history = [[] for _ in range(B)]
            else:
                real = [[True] * T] * B
            past = [list(h) for h in cache.history]
            for b in range(B):
                cache.history[b] += [t for t, r in zip(rows[b], real[b], strict=True) if r]
            cache.advance(T)
        else:
            real, past = [[True] * T] * B, [[] for _ in range(B)]
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            prefix = list(past[b])
            for t in range(T):
                if real[b][t]:
                    prefix.append(rows[b][t])
                nxt = self.next_token(prefix)
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


class BiasLM(torch.nn.Module):
    """The same next-token distribution everywhere: ``softmax(bias)``."""

    def __init__(self, bias: torch.Tensor, positions: str = "rope", max_seq_len: int = 4096):
        super().__init__()
        self.bias = torch.nn.Parameter(bias.clone())
        self.cfg = SimpleNamespace(positions=positions, max_seq_len=max_seq_len, doc_mask=False)

    def forward(self, ids, **_):
        return self.bias.expand(*ids.shape, -1)


def conv(task, question, answer):
    return {"task": task, "answer": answer,
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def prompt_of(tok, c):
    """What evaluate prompts a model with: the chat template up to the assistant's turn."""
    return tuple(tok.encode(render_chat(c["messages"][:-1], add_generation_prompt=True)))


def test_task_accuracy_counts_exact_matches_and_im_end(tiny_tokenizer):
    tok = tiny_tokenizer
    end = [tok.im_end_id]
    cases = [  # (conversation, the rigged reply's tokens)
        (conv("arithmetic", "What is 1 + 1?", "2"), tok.encode_text(" 2 ") + end),  # right
        (conv("arithmetic", "What is 2 + 2?", "4"), tok.encode_text("4") + end),  # right
        (conv("arithmetic", "What is 3 + 3?", "6"), tok.encode_text("7") + end),  # wrong
        (conv("arithmetic", "What is 4 + 4?", "8"), tok.encode_text("8")),  # right, then eot
        (conv("arithmetic", "What is 5 + 5?", "10"), tok.encode_text("10") + end),  # over max
        ({**conv("spell", "Spell the word 'ab'.", "a-b"), "pool": ["word:ab", "stem:ab"]},
         tok.encode_text("a-b-a-b-a-b-a-b")),
        ({**conv("spell", "Spell the word 'cd'.", "c-d"), "pool": ["word:cd"]},
         tok.encode_text("c-d") + end),
        (conv("doc", "What is a list?", "A sequence."), tok.encode_text("A sequence.") + end),
        ({**conv("count", "How many?", "1"), "answer": None}, tok.encode_text("1") + end),
    ]
    assert len(cases[5][1]) > 6  # longer than the budget: cut, not ended
    model = ScriptedLM(tok.vocab_size, {prompt_of(tok, c): r for c, r in cases}, tok.eot_id)
    got = task_accuracy(model, tok, [c for c, _ in cases], max_per_task=4, max_new_tokens=6,
                        batch_size=3)
    pieces = {w: len(tok.encode(f" '{w}'.")) - 2 for w in ("ab", "cd")}
    replies = got["arithmetic"].pop("replies"), got["spell"].pop("replies")
    assert got == {  # doc and answer-less conversations are not tasks; 4 per task at most
        "arithmetic": {"exact_match": 0.75, "im_end_rate": 0.75, "n": 4,
                       "ci95": wilson_interval(3, 4), "correct": [True, True, False, True],
                       "pieces": [None] * 4},
        "spell": {"exact_match": 0.5, "im_end_rate": 0.5, "n": 2,
                  "ci95": wilson_interval(1, 2), "correct": [False, True],
                  "pieces": [pieces["ab"], pieces["cd"]]},
    }
    assert replies[0] == ["2", "4", "7", "8"] and replies[1][1] == "c-d"
    assert "a-b-a-b-a-b-a-b".startswith(replies[1][0]) and len(replies[1][0]) > 3  # cut off


def test_word_tasks_are_reported_on_multi_and_single_token_words():
    result = {"correct": [True, False, True, True, False], "pieces": [1, 2, 3, None, 1]}
    assert by_pieces(result) == {"multi": (1, 2), "single": (1, 2)}
    assert by_pieces({"correct": [True], "pieces": [None]}) == {}
    tasks = {"spell": {"exact_match": 0.6, "ci95": (0.2, 0.9), "n": 5, **result},
             "arithmetic": {"exact_match": 0.5, "ci95": (0.1, 0.9), "n": 2,
                            "correct": [True, False], "pieces": [None, None]}}
    m = task_metrics("val", tasks)
    assert m["evaluate/val/spell_multi_exact_match"] == 0.5
    assert m["evaluate/val/spell_single_n"] == 2 and m["evaluate/val/spell_multi_n"] == 2
    assert m["evaluate/val/spell_multi_exact_match_ci95_low"] == round(wilson_interval(1, 2)[0], 5)
    assert "evaluate/val/arithmetic_multi_exact_match" not in m
    assert m["evaluate/val/arithmetic_exact_match"] == 0.5


def test_drawn_samples_are_seeded_and_carry_the_reply_and_verdict():
    convs = [{**conv("spell", f"Spell the word '{w}'.", "-".join(w)), "pool": [f"word:{w}"]}
             for w in ("ab", "cd", "ef", "gh")]
    tasks = {"spell": {"correct": [True, False, True, False], "pieces": [1, 2, 1, 2],
                       "replies": ["a-b", "c-x", "e-f", "g"]}}
    drawn = drawn_samples(tasks, convs, per_task=2, seed=3)
    assert drawn == drawn_samples(tasks, convs, per_task=2, seed=3) and len(drawn) == 2
    for d in drawn:
        i = ["ab", "cd", "ef", "gh"].index(d["question"].split("'")[1])
        assert d["reply"] == tasks["spell"]["replies"][i]
        assert d["correct"] == tasks["spell"]["correct"][i] and d["answer"] == convs[i]["answer"]
        assert d["pieces"] == tasks["spell"]["pieces"][i] and d["task"] == "spell"
    assert {tuple(d["question"] for d in drawn_samples(tasks, convs, 2, seed=s))
            for s in range(8)} != {tuple(d["question"] for d in drawn)}  # the seed draws


def test_doc_multiple_choice_picks_the_likeliest_candidate(tiny_tokenizer):
    tok = tiny_tokenizer
    answers = ["Use a list.", "Call len() on it.", "A tuple is immutable.", "Import it first."]
    docs = [conv("doc", f"Question {i}?", a) for i, a in enumerate(answers)]
    other = conv("arithmetic", "What is 1 + 1?", "2")
    # the model prefers the documented answer of questions 0-2, and answer 0 for question 3
    prefer = [answers[0], answers[1], answers[2], answers[0]]
    scripts = {prompt_of(tok, c): tok.encode(p + IM_END) for c, p in zip(docs, prefer, strict=True)}
    model = ScriptedLM(tok.vocab_size, scripts, tok.eot_id)
    # 4 choices of 4 documented answers: every question sees every answer
    got = doc_multiple_choice(model, tok, docs + [other], choices=4, max_questions=10)
    assert got == {"accuracy": 0.75, "n": 4, "chance": 0.25, "ci95": wilson_interval(3, 4),
                   "correct": [1.0, 1.0, 1.0, 0.0]}
    first_two = doc_multiple_choice(model, tok, docs, choices=4, max_questions=2, seed=5)
    assert first_two["accuracy"] == 1.0 and first_two["n"] == 2
    too_few = doc_multiple_choice(model, tok, docs[:3] + [other], choices=4, max_questions=10)
    assert math.isnan(too_few["accuracy"]) and too_few["n"] == 0


def doc_convs(n: int) -> list[dict]:
    """``n`` doc questions with distinct answers of 1 to 5 words (different token counts)."""
    return [conv("doc", f"Question {i}?", f"Answer {i}" + " more" * (i % 5) + ".")
            for i in range(n)]


def test_a_model_without_preference_scores_exactly_chance(tiny_tokenizer):
    tok = tiny_tokenizer
    uniform = BiasLM(torch.zeros(tok.vocab_size))
    got = doc_multiple_choice(uniform, tok, doc_convs(200), choices=4, max_questions=200)
    # every candidate ties (up to float32 rounding: the means over different token counts
    # are not all bitwise equal), so each question earns 1/4; with the answer always first
    # and the first of equal scores winning, this model used to score 1.0
    assert got["n"] == 200 and got["correct"] == [0.25] * 200
    assert got["accuracy"] == 0.25 == got["chance"]
    low, high = got["ci95"]
    assert low < 0.25 < high and (low, high) == wilson_interval(50, 200)


def test_choice_credit_shares_a_tie_and_ignores_rounding():
    assert choice_credit([-1.0, -2.0, -3.0], 0) == 1.0
    assert choice_credit([-1.0, -2.0, -3.0], 1) == 0.0
    assert choice_credit([-2.0, -1.0, -1.0, -3.0], 2) == 0.5
    assert choice_credit([-2.0, -1.0, -1.0, -3.0], 0) == 0.0
    assert choice_credit([-4.0] * 4, 3) == 0.25
    assert choice_credit([-5.7037826, -5.7037816, -9.0], 0) == 0.5  # float32 ulps apart
    assert choice_credit([-5.70, -5.71], 1) == 0.0  # a real preference is not a tie
    assert choice_credit([math.nan, -2.0, -1.0], 2) == 1.0  # NaN is never the best
    assert choice_credit([math.nan, math.nan], 0) == 0.0
    with pytest.raises(IndexError):
        choice_credit([-1.0, -2.0], 2)


def test_distractors_differ_from_the_answer_and_each_other_as_text():
    answers = ["Use a list.", "  use a   LIST. ", "Call len() on it.", "A tuple is immutable.",
               "Import it first.", "USE A LIST.", "import it\tfirst."]
    convs = [conv("doc", f"Question {i}?", a) for i, a in enumerate(answers)]
    distinct = {normalise_answer(a) for a in answers}
    assert len(distinct) == 4
    for seed in range(20):
        items = doc_mc_items(convs, 4, 10, seed)
        assert len(items) == len(answers)
        for it, c in zip(items, convs, strict=True):
            assert it.conv is c and it.candidates[it.gold] == c["answer"]
            assert {normalise_answer(a) for a in it.candidates} == distinct  # 4 distinct
    # 7 questions but 4 distinct answers: 5 choices cannot be filled, for any question
    assert doc_mc_items(convs, 5, 10) == []


def test_gold_positions_are_spread_and_seeded():
    convs = doc_convs(200)
    items = doc_mc_items(convs, 4, 200, seed=3)
    golds = [it.gold for it in items]
    assert all(it.candidates[it.gold] == it.conv["answer"] for it in items)
    assert all(30 <= golds.count(g) <= 70 for g in range(4))  # ~50 each, none always
    assert doc_mc_items(convs, 4, 200, seed=3) == items  # the same draw every call
    assert [it.gold for it in doc_mc_items(convs, 4, 200, seed=4)] != golds
    # the first questions' items do not depend on how many are asked
    assert doc_mc_items(convs, 4, 10, seed=3) == items[:10]


def test_mean_logprob_masks_exactly_the_kept_candidate_tokens():
    torch.manual_seed(0)
    bias = torch.randn(50)
    model = BiasLM(bias)  # log p(token) = logp[token] whatever the context
    logp = torch.log_softmax(bias, 0)

    def direct(tokens: list[int]) -> float:
        return float(logp[tokens].mean())

    prompt, short, long = list(range(10)), [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]
    # max_len 14: the short candidate fits, the long one keeps its first 4 tokens
    got = _mean_logprob(model, prompt, [short, long], pad_id=0, max_len=14)
    assert got == pytest.approx([direct(short), direct(long[:4])], rel=1e-6)
    assert got[1] != pytest.approx(direct(prompt[-4:] + long[:4]), rel=1e-3)  # the old mask
    # a prompt longer than max_len: cut from the left, each candidate scored on its first token
    got = _mean_logprob(model, list(range(30)), [short, long], pad_id=0, max_len=14)
    assert got == pytest.approx([direct(short[:1]), direct(long[:1])], rel=1e-6)


def expected_bpb(ds: ShardDataset, rows: int, bias: torch.Tensor, tb: torch.Tensor,
                 window: int | None) -> float:
    """Bits per byte of BiasLM by hand: every text target costs -log p(target) under
    softmax(bias), whatever its context; special tokens (0 bytes) and unmasked ones are free."""
    logp = torch.log_softmax(bias.double(), dim=0)
    ids, masks = [], []
    for i in range(rows):
        r, m = ds[i]
        ids.append(torch.as_tensor(r.astype("int64")))
        masks.append(torch.ones(len(r)) if m is None else torch.as_tensor(m.astype("float64")))
    if window is None:  # each row: its targets are tokens 1..T
        targets = torch.cat([r[1:] for r in ids])
        mask = torch.cat([m[1:] for m in masks])
    else:  # consecutive rows share their boundary token: one stream, cut into windows
        stream = torch.cat([ids[0]] + [r[1:] for r in ids[1:]])
        mstream = torch.cat([masks[0]] + [m[1:] for m in masks[1:]])
        n = (len(stream) - 1) // window * window
        targets, mask = stream[1 : n + 1], mstream[1 : n + 1]
    text = (tb[targets] > 0).double() * mask.double()
    bits = float((-logp[targets] * text).sum()) / LN2
    return bits / float((tb[targets].double() * mask.double()).sum())


@pytest.fixture(scope="module")
def bias_setup(tiny_shards):
    shard_dir, tok = tiny_shards
    torch.manual_seed(0)
    bias = torch.randn(tok.vocab_size) * 2
    return shard_dir, tok, bias, torch.tensor(token_bytes(tok))


def test_bpb_at_contexts_by_hand(bias_setup):
    shard_dir, _, bias, tb = bias_setup
    ds = ShardDataset(shard_dir, "pretrain_val")
    seq_len, rows = ds.row_len - 1, 10
    assert seq_len == 32 and len(ds) > rows
    cpu = torch.device("cpu")
    # 10 rows of 32 targets: 320 at 1x; 5 windows of 64 at 2x; 2 windows of 128 at 4x
    got = bpb_at_contexts(BiasLM(bias), ds, tb, [1, 2, 4, 10_000], batch_size=5,
                          max_rows=rows, device=cpu, dtype=torch.float32)
    assert [got[f]["tokens"] for f in (1, 2, 4)] == [320, 320, 256]
    want = {f: expected_bpb(ds, rows, bias, tb, None if f == 1 else f * seq_len)
            for f in (1, 2, 4)}
    assert want[4] != pytest.approx(want[1], rel=1e-3)  # the windows read different targets
    for f in (1, 2, 4):
        assert got[f]["bpb"] == pytest.approx(want[f], rel=1e-5), f
    assert got[10_000] is None  # more than the held-out text: not one window
    # a learned position table of 64: 2x fits, 4x has no rows to run on
    learned = bpb_at_contexts(BiasLM(bias, "learned", 64), ds, tb, [1, 2, 4], 5, rows, cpu,
                              torch.float32)
    assert learned[4] is None and learned[2]["bpb"] == pytest.approx(want[2], rel=1e-5)
    # the uniform model: ln(V) nats on every token, whatever the text and the context
    uniform = bpb_at_contexts(BiasLM(torch.zeros_like(bias)), ds, tb, [1, 2], 5, rows, cpu,
                              torch.float32)
    assert all(uniform[f]["loss"] == pytest.approx(math.log(len(bias)), rel=1e-6)
               for f in (1, 2))


def test_split_bpb_scores_every_row_on_its_masked_tokens(bias_setup):
    shard_dir, _, bias, tb = bias_setup
    ds = ShardDataset(shard_dir, "sft_val")
    assert ds.has_loss_mask and len(ds) > 5
    want = expected_bpb(ds, len(ds), bias, tb, None)
    assert split_bpb(BiasLM(bias), ds, tb, batch_size=4) == pytest.approx(want, rel=1e-5)
    # a model that puts more mass on the text it reads scores fewer bits
    counts = torch.zeros(len(bias))
    for i in range(len(ds)):
        r, m = ds[i]
        t = torch.as_tensor(r[1:].astype("int64"))
        counts.index_add_(0, t, torch.as_tensor(m[1:].astype("float32")))
    unigram = torch.log(counts + 0.1)
    assert split_bpb(BiasLM(unigram), ds, tb) < split_bpb(BiasLM(torch.zeros_like(bias)), ds, tb)


def test_summary_metrics_flattens_weights_rounds_and_blanks_nan():
    tasks = {"arithmetic": {"exact_match": 0.75, "im_end_rate": 0.5, "n": 4,
                            "ci95": (0.30064, 0.95441)},
             "spell": {"exact_match": 1 / 3, "im_end_rate": 1.0, "n": 6, "ci95": (0.1, 0.7)}}
    results = {
        "pretrain": {"contexts": {1: {"bpb": 2.123456789, "loss": 1.0}, 2: {"bpb": 2.5},
                                  4: None},
                     "sft": {"bpb": 3.0, "loss": math.nan},
                     "tasks": tasks,
                     "doc_mc": {"accuracy": math.nan, "n": 0, "chance": 0.25,
                                "ci95": (math.nan, math.nan)}},
        "sft": {"contexts": {1: None, 2: None, 4: None}, "sft": {"bpb": 1.5, "loss": 1.25},
                "tasks": {}, "doc_mc": {"accuracy": 0.5, "n": 8, "chance": 0.25,
                                        "ci95": (0.2, 0.8)}},
    }
    got = summary_metrics(results, [2, 4])
    assert got == {
        "evaluate/pretrain/docs_bpb": 2.12346,
        "evaluate/pretrain/sft_bpb": 3.0,
        "evaluate/pretrain/sft_loss": None,
        "evaluate/pretrain/bpb_ctx2x": 2.5,
        "evaluate/pretrain/bpb_ctx4x": None,
        "evaluate/pretrain/arithmetic_exact_match": 0.75,
        "evaluate/pretrain/arithmetic_exact_match_ci95_low": 0.30064,
        "evaluate/pretrain/arithmetic_exact_match_ci95_high": 0.95441,
        "evaluate/pretrain/arithmetic_n": 4,
        "evaluate/pretrain/spell_exact_match": 0.33333,
        "evaluate/pretrain/spell_exact_match_ci95_low": 0.1,
        "evaluate/pretrain/spell_exact_match_ci95_high": 0.7,
        "evaluate/pretrain/spell_n": 6,
        "evaluate/pretrain/im_end_rate": 0.8,  # (0.5 * 4 + 1.0 * 6) / 10: weighted by n
        "evaluate/pretrain/doc_mc_accuracy": None,
        "evaluate/pretrain/doc_mc_accuracy_ci95_low": None,
        "evaluate/pretrain/doc_mc_accuracy_ci95_high": None,
        "evaluate/pretrain/doc_mc_n": 0,
        "evaluate/sft/docs_bpb": None,
        "evaluate/sft/sft_bpb": 1.5,
        "evaluate/sft/sft_loss": 1.25,
        "evaluate/sft/bpb_ctx2x": None,
        "evaluate/sft/bpb_ctx4x": None,
        "evaluate/sft/im_end_rate": 0.0,  # no task measured
        "evaluate/sft/doc_mc_accuracy": 0.5,
        "evaluate/sft/doc_mc_accuracy_ci95_low": 0.2,
        "evaluate/sft/doc_mc_accuracy_ci95_high": 0.8,
        "evaluate/sft/doc_mc_n": 8,
    }


def test_wilson_interval_closed_forms():
    z2 = 1.96**2
    for n in (1, 4, 30):
        assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)))  # none right
        assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0))  # all right
    low, high = wilson_interval(5, 10)  # symmetric about 1/2
    assert low + high == pytest.approx(1.0) and high - low == pytest.approx(
        2 * 1.96 * math.sqrt(0.25 / 10 + z2 / 400) / (1 + z2 / 10))


def test_a_row_subset_scores_exactly_its_own_rows(bias_setup):
    from llmcore.model.loss import heldout_loss

    shard_dir, _, bias, tb = bias_setup
    ds = ShardDataset(shard_dir, "pretrain_val")
    model, cpu = BiasLM(bias), torch.device("cpu")

    def bits(d, rows):
        r = heldout_loss(model, d, 1, rows, tb, cpu, torch.float32)
        return r["bpb"] * r["bytes"], r["bytes"]

    # row k alone carries the bits the first k + 1 rows have beyond the first k
    for k in (3, 7):
        (b1, n1), (b0, n0) = bits(ds, k + 1), bits(ds, k)
        one = bits(ds.subset([k]), 1)
        assert one[0] == pytest.approx(b1 - b0, rel=1e-5) and one[1] == n1 - n0
    both = heldout_loss(model, ds.subset([7, 3]), 2, 1, tb, cpu, torch.float32)
    assert both["bytes"] == bits(ds.subset([3]), 1)[1] + bits(ds.subset([7]), 1)[1]
    with pytest.raises(IndexError):
        ds.subset([len(ds)])
