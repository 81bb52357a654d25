"""DPO and GRPO: the losses against hand computations, and short runs that must learn."""

import copy
import math
import random

import pytest
import torch

from llmcore.align.dpo import (
    dpo_loss,
    encode_pairs,
    reference_logprobs,
    task_pairs,
    train_dpo,
)
from llmcore.align.grpo import group_advantages, grpo_loss, reward, train_grpo
from llmcore.align.replies import (
    batched_sequence_logprobs,
    reply_rows,
    sequence_logprobs,
    token_logprobs,
)
from llmcore.config.dpo import DPOConfig
from llmcore.config.model import parse_model
from llmcore.config.rl import RLConfig
from llmcore.data.tasks import is_correct, wrong_answer
from llmcore.model.transformer import Transformer
from llmcore.train.step import RunContext


def quiet_context(name: str) -> RunContext:
    """CPU, fp32, no checkpoints, no log lines."""
    return RunContext(torch.device("cpu"), torch.float32, log=lambda m: None, name=name)


def tiny(seed=0, vocab=300):
    torch.manual_seed(seed)
    cfg = parse_model({"preset": "tiny", "vocab_size": vocab, "max_seq_len": 128})
    return Transformer(cfg)


def test_dpo_loss_equals_a_hand_computation():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.2]), torch.tensor([-3.9, -4.0])
    beta = 0.5
    loss, rewards = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: 0.5 * ((-3 + 3.5) - (-4 + 3.9)) = 0.3; pair 2: 0.5 * ((-5 + 5.2) - (-4.5 + 4)) = 0.35
    expected = -(math.log(1 / (1 + math.exp(-0.3))) + math.log(1 / (1 + math.exp(-0.35)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert rewards["chosen"].tolist() == pytest.approx([0.25, 0.1])
    assert rewards["rejected"].tolist() == pytest.approx([-0.05, -0.25])
    # RPO: plus the chosen replies' NLL per token, here (3/2 + 5/4) / 2
    with_nll, _ = dpo_loss(pc, pr, rc, rr, beta, nll_coef=1.0,
                           chosen_tokens=torch.tensor([2.0, 4.0]))
    assert with_nll.item() == pytest.approx(expected + (1.5 + 1.25) / 2, abs=1e-6)


def test_sequence_logprobs_sum_only_the_reply(tiny_tokenizer):
    model = tiny().eval()
    items = [([{"role": "user", "content": "hi"}], "hello there"),
             ([{"role": "user", "content": "a longer question here"}], "no")]
    ids, mask, kept = reply_rows(tiny_tokenizer, items, 128)
    assert kept == [0, 1] and ids.shape[0] == 2
    n_reply = len(tiny_tokenizer.encode_text("hello there")) + 1  # + <|im_end|>
    assert int(mask[0].sum()) == n_reply
    assert ids[0, int(mask[0].nonzero().max())] == tiny_tokenizer.im_end_id
    with torch.no_grad():
        lp = token_logprobs(model, ids)
        got = sequence_logprobs(model, ids, mask)
    by_hand = sum(lp[0, t - 1].item() for t in range(ids.shape[1]) if mask[0, t])
    assert got[0].item() == pytest.approx(by_hand, abs=1e-5)
    assert reply_rows(tiny_tokenizer, items, 8)[2] == []  # too long for 8 tokens: left out


def test_dpo_gradients_reach_only_the_policy_and_training_raises_reward_accuracy(
        tiny_tokenizer):
    ref, policy = tiny(1), tiny(1)
    prompts = [f"question {i}" for i in range(24)]
    pairs = [{"prompt": [{"role": "user", "content": p}], "chosen": "yes indeed",
              "rejected": "no way"} for p in prompts]
    kept, rows = encode_pairs(tiny_tokenizer, pairs, 128)
    refs = reference_logprobs(ref, kept, rows)
    ids, mask = rows(kept[:4])
    lp = sequence_logprobs(policy, ids, mask)
    r = torch.tensor(refs[:4])
    loss, _ = dpo_loss(lp[:4], lp[4:], r[:, 0], r[:, 1], 0.1)
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.zero_grad()
    cfg = DPOConfig(beta=0.5, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=30,
                    batch_size=8, eval_every=30)
    result = train_dpo(policy, kept[:16], refs[:16], kept[16:], refs[16:], rows, cfg,
                       quiet_context("dpo"), seed=0)
    assert result.evals[-1]["reward_accuracy"] == 1.0 and result.evals[-1]["reward_margin"] > 0
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_task_pairs_are_on_policy_and_always_prefer_the_answer(tiny_tokenizer):
    model = tiny(2).eval()
    with torch.no_grad():  # no stop token: replies are never empty
        for i in (tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id):
            model.lm_head.weight[i] = 0.0
    convs = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                           {"role": "assistant", "content": str(i + 1)}],
              "task": "arithmetic", "answer": str(i + 1)} for i in range(6)]
    pairs, own = task_pairs(model, tiny_tokenizer, convs, 8, seed=0)
    assert len(pairs) == 6 and all(p["chosen"] == c["messages"][-1]["content"]
                                   for p, c in zip(pairs, convs, strict=True))
    assert all(not is_correct(p["rejected"], c["answer"]) for p, c in zip(pairs, convs, strict=True))
    greedy = [p for p in pairs if p["source"] == "builtin:on-policy"]
    assert own == len(greedy) > 0  # a random model answers wrongly: its answers are rejected
    ids = [tiny_tokenizer.encode_prompt(c["messages"][:-1]) for c in convs]
    from llmcore.infer.generate import Sampling, generate

    own_replies = [tiny_tokenizer.decode(o) for o in generate(model, ids, Sampling(8))]
    assert all(p["rejected"] == r for p, r in zip(pairs, own_replies, strict=True)
               if p["source"] == "builtin:on-policy")


def test_wrong_answers_are_wrong_and_shaped_like_the_answer():
    rng = random.Random(0)
    for task, answer in [("arithmetic", "19"), ("arithmetic", "-4"), ("count", "0"),
                         ("spell", "l-i-s-t"), ("reverse", "kcats"), ("reverse", "a")]:
        for _ in range(50):
            w = wrong_answer(task, answer, rng)
            assert w.strip() != answer.strip()
            if task in ("arithmetic", "count"):
                assert w.lstrip("-").isdigit()


def test_grpo_advantages_are_group_normalised_and_equal_rewards_teach_nothing():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards)
    assert adv[0].mean().item() == pytest.approx(0, abs=1e-6)
    assert adv[0].std(unbiased=False).item() == pytest.approx(1, abs=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))
    logp = torch.randn(4, 5, requires_grad=True)
    mask = torch.ones(4, 5)
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(4), mask, 0.2, 0.0)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros(4, 5))
    # a positive advantage pushes its tokens up; clipping stops the push past 1 + clip
    logp2 = torch.zeros(1, 3, requires_grad=True)
    loss2, _ = grpo_loss(logp2, torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1),
                         torch.ones(1, 3), 0.2, 0.0)
    loss2.backward()
    assert (logp2.grad < 0).all()
    far = torch.full((1, 3), 0.5, requires_grad=True)  # ratio e^0.5 > 1.2: clipped
    loss3, _ = grpo_loss(far, torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1),
                         torch.ones(1, 3), 0.2, 0.0)
    loss3.backward()
    assert torch.equal(far.grad, torch.zeros(1, 3))


def test_grpo_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    _, at_ref = grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 2), 0.2, 0.1)
    _, away = grpo_loss(logp, logp, logp - 0.3, torch.zeros(1), torch.ones(1, 2), 0.2, 0.1)
    assert at_ref["kl"] == pytest.approx(0, abs=1e-7) and away["kl"] > 0


def test_a_grpo_step_raises_rewarded_replies_and_lowers_the_others(tiny_tokenizer):
    from llmcore.align.replies import prompt_reply_rows

    policy, ref = tiny(3), tiny(3)
    prompt = tiny_tokenizer.encode_prompt([{"role": "user", "content": "say yes"}])
    replies = [tiny_tokenizer.encode_text(w) + [tiny_tokenizer.im_end_id]
               for w in ("yes", "no", "maybe", "never")]
    ids, mask = prompt_reply_rows([prompt] * 4, replies, tiny_tokenizer.pad_id, torch.device("cpu"))
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]

    def seq_lp():
        with torch.no_grad():
            return (token_logprobs(policy, ids) * mask).sum(dim=1)

    before = seq_lp()
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    logp = token_logprobs(policy, ids)
    loss, _ = grpo_loss(logp, logp.detach(), token_logprobs(ref, ids).detach(), adv, mask,
                        0.2, 0.04)
    loss.backward()
    opt.step()
    after = seq_lp()
    assert after[0] > before[0] and (after[1:] < before[1:]).all(), (before, after)


def test_grpo_reward_exact_values(tiny_tokenizer):
    tok, pen = tiny_tokenizer, 0.25

    def r(text, answer, end=(tok.im_end_id,)):
        return reward(tok.encode_text(text) + list(end), answer, tok, pen)

    assert r("42", "42") == 1.0  # right, and ends with <|im_end|>
    assert r("42", "42", end=()) == 1.0 - pen  # right, cut at the token budget
    assert r("42", "42", end=(tok.eot_id,)) == 1.0 - pen  # <|endoftext|> is not the turn's end
    assert r("43", "42") == 0.0 and r("43", "42", end=()) == -pen  # wrong
    # outer whitespace is ignored on both sides (is_correct), inner whitespace and case are not
    assert r(" 42 \n", "42") == 1.0 and r("42", " 42\n") == 1.0
    assert r("4 2", "42") == 0.0 and r("Yes", "yes") == 0.0
    assert reward([], "42", tok, pen) == -pen and reward([tok.im_end_id], "42", tok, pen) == 0.0
    assert reward([tok.im_end_id], "", tok, pen) == 1.0  # an empty answer, answered


def test_train_grpo_learns_a_fixed_answer(tiny_tokenizer):
    """Every task's answer is "7". The policy starts with a prior like a pretrained model's
    (the ten digit tokens hold ~80% of the first token's mass, ~8% each), so a group of
    one-token replies usually holds a right one: GRPO must raise it above the other digits."""
    tok = tiny_tokenizer
    digits = [tok.encode_text(str(d)) for d in range(10)]
    assert all(len(d) == 1 for d in digits)
    digits = [d[0] for d in digits]
    tasks = [{"messages": [{"role": "user", "content": f"What is {i} + {7 - i}?"},
                           {"role": "assistant", "content": "7"}], "answer": "7"}
             for i in range(8)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~15x faster for this tiny model on a busy 2-core machine
    try:
        policy = tiny(0)
        last_hidden: list[torch.Tensor] = []
        hook = policy.lm_head.register_forward_hook(
            lambda m, args, out: last_hidden.append(args[0][:, -1]))
        with torch.no_grad():
            for t in tasks:
                policy(torch.tensor([tok.encode_prompt(t["messages"][:-1])]))
        hook.remove()
        u = torch.cat(last_hidden).mean(0)
        with torch.no_grad():  # every digit: a logit of ~4.75 after the prompts, the rest ~0
            for d in digits:
                policy.lm_head.weight[d] = u * (4.75 / float(u @ u))
        ref = copy.deepcopy(policy)
        ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
        cfg = RLConfig(max_steps=16, lr=5e-3, min_lr=0.0, optimizer="adamw",
                       prompts_per_step=4, group_size=8, max_new_tokens=1)
        result = train_grpo(policy, ref, tok, tasks, cfg, quiet_context("rl"), seed=0)
    finally:
        torch.set_num_threads(threads)
    rewards = [h["reward"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, 17))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # one token, never <|im_end|>: "7" scores 0.9, any other reply -0.1; chance is ~-0.02
    assert first < 0.1 and last > 0.5 and last - first > 0.4, rewards
    assert result.history[-1]["exact"] > 0.5, result.history[-1]
    assert result.history[-1]["kl"] > 0  # the policy moved away from the reference ...
    assert all(p.grad is None for p in ref.parameters())  # ... and only the policy trained
    assert all(torch.equal(v, ref_state[k]) for k, v in ref.state_dict().items())


def test_reference_logprobs_need_no_gradients(tiny_tokenizer):
    model = tiny(4)
    ids, mask, _ = reply_rows(tiny_tokenizer, [([{"role": "user", "content": "x"}], "y")], 64)
    out = batched_sequence_logprobs(model, ids, mask)
    assert not out.requires_grad and out.shape == (1,)


def test_sampled_kl_is_zero_against_itself_and_positive_against_another_model(tiny_tokenizer):
    from llmcore.align.replies import sampled_kl

    a, b = tiny(5).eval(), tiny(6).eval()
    prompts = [[{"role": "user", "content": f"q {i}"}] for i in range(6)]
    assert sampled_kl(a, a, tiny_tokenizer, prompts, 6, seed=0) == pytest.approx(0, abs=1e-5)
    assert sampled_kl(a, b, tiny_tokenizer, prompts, 6, seed=0) > 0
