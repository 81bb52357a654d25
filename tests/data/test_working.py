"""Word-task replies worked token by token: the lines added, the answer kept."""

from llmcore.data.tasks import final_answer, is_correct, synthetic_conversations
from llmcore.data.working import work_pieces

PIECES = {"thousands": ["th", "ous", "and", "s"], "read": ["read"]}


def pieces_of(word):
    if word in PIECES:
        return PIECES[word]
    return [word[:3], word[3:]] if len(word) > 3 else [word]


def test_a_word_of_several_tokens_is_spelled_token_by_token_first():
    msgs = [{"role": "user", "content": "Spell the word 'thousands'."},
            {"role": "assistant", "content": "t-h-o-u-s-a-n-d-s"}]
    out = work_pieces(msgs, lambda w: PIECES[w])
    assert out[1]["content"] == "th=t-h\nous=o-u-s\nand=a-n-d\ns=s\nt-h-o-u-s-a-n-d-s"
    assert msgs[1]["content"] == "t-h-o-u-s-a-n-d-s"  # the input is not changed
    one = [{"role": "user", "content": "Spell the word 'read'."},
           {"role": "assistant", "content": "r-e-a-d"}]
    assert work_pieces(one, lambda w: PIECES[w]) == one  # one token: nothing to compose


def test_every_word_task_keeps_its_answer_and_other_turns_stay():
    convs = [c.as_dicts() for c in synthetic_conversations(40, seed=2)]
    changed = 0
    for conv in convs:
        out = work_pieces(conv, pieces_of)
        assert [m["role"] for m in out] == [m["role"] for m in conv]
        for before, after in zip(conv, out, strict=True):
            if before["role"] != "assistant":
                assert after == before
                continue
            assert final_answer(after["content"]) == final_answer(before["content"])
            assert after["content"].endswith(before["content"])
            changed += after != before
    assert changed > 40  # spell, count and reverse replies (not arithmetic)
    arithmetic = [c for c in convs if "What is" in c[-2]["content"]]
    assert arithmetic and all(work_pieces(c, pieces_of) == c for c in arithmetic)
    # the check reads the last line: a worked reply is judged by its answer alone
    worked = work_pieces([{"role": "user", "content": "Reverse the letters of the word 'stack'."},
                          {"role": "assistant", "content": "s-t-a-c-k\nk-c-a-t-s"}], pieces_of)
    assert worked[1]["content"].startswith("sta=s-t-a\nck=c-k\n")
    assert is_correct(worked[1]["content"], "k-c-a-t-s")


def test_pieces_that_do_not_make_the_word_are_not_written():
    msgs = [{"role": "user", "content": "Spell the word 'thousands'."},
            {"role": "assistant", "content": "t-h-o-u-s-a-n-d-s"}]
    assert work_pieces(msgs, lambda w: ["thou", "sand"]) == msgs  # an "s" short
