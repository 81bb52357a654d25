import pytest
from transformers import AutoTokenizer

from llmcore.data.tokenizer import (
    CHAT_TEMPLATE,
    EOT,
    IM_END,
    IM_START,
    PAD,
    LLMTokenizer,
    render_chat,
    train_bpe,
)
from llmcore.schema import UserError
from tests.conftest import SAMPLE_TEXTS

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And   spelled?"},
    {"role": "assistant", "content": "  f-i-v-e\n"},
]


@pytest.mark.parametrize("text", [
    "plain ascii",
    "  leading and trailing spaces  \n\n\t",
    "中文：你好，世界。日本語とか한국어",
    "emoji 🎉👩‍👩‍👧‍👦 and combining e\u0301",
    "def f(x):\r\n\treturn {'a': [1, 2]}  # code\n",
    "literal specials <|im_end|> and <|endoftext|> inside text",
    "\x00\x01 control \u200b zero-width",
    "",
])
def test_round_trip_is_exact(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_tokens_have_fixed_ids(tiny_tokenizer):
    assert [tiny_tokenizer.tok.token_to_id(t) for t in (EOT, IM_START, IM_END, PAD)] == [0, 1, 2, 3]
    assert tiny_tokenizer.encode("<|im_end|>") == [2]
    assert tiny_tokenizer.vocab_size == 300


def test_digits_are_split(tiny_tokenizer):
    numbers = ["12345 67890 12345"] * 50
    split = LLMTokenizer(train_bpe(numbers, 300, 1, split_digits=True))
    assert len(split.encode("12345")) == 5
    merged = LLMTokenizer(train_bpe(numbers, 300, 1, split_digits=False))
    assert len(merged.encode("12345")) < 5


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        train_bpe(SAMPLE_TEXTS, 100)


def test_loss_mask_covers_exactly_assistant_replies(tiny_tokenizer):
    ids, mask = tiny_tokenizer.encode_chat(CHAT)
    assert len(ids) == len(mask)
    trained = "".join(tiny_tokenizer.decode([i]) for i, m in zip(ids, mask, strict=True) if m)
    assert trained == "5<|im_end|>  f-i-v-e\n<|im_end|>"
    # every im_end closing an assistant turn is trained, those closing other turns are not
    im_end_masks = [m for i, m in zip(ids, mask, strict=True) if i == tiny_tokenizer.im_end_id]
    assert im_end_masks == [0, 0, 1, 0, 1]
    assert tiny_tokenizer.decode(ids) == render_chat(CHAT)


def test_batch_chat_encoding_equals_single(tiny_tokenizer):
    convs = [CHAT, CHAT[1:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]]
    assert tiny_tokenizer.encode_chat_batch(convs) == [tiny_tokenizer.encode_chat(c) for c in convs]


def test_generation_prompt(tiny_tokenizer):
    text = render_chat(CHAT[:2], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids, mask = tiny_tokenizer.encode_chat(CHAT[:2], add_generation_prompt=True)
    assert sum(mask) == 0 and tiny_tokenizer.decode(ids) == text


def test_saved_directory_loads_in_transformers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.chat_template == CHAT_TEMPLATE
    text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(CHAT, add_generation_prompt=True)
    out = hf.apply_chat_template(CHAT, tokenize=True)
    hf_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert hf_ids == tiny_tokenizer.encode_chat(CHAT)[0]
    assert hf.eos_token == IM_END and hf.pad_token_id == tiny_tokenizer.pad_id
    reloaded = LLMTokenizer.load(tmp_path)
    assert reloaded.sha256() == tiny_tokenizer.sha256()


def test_load_missing_directory_names_the_stage(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer.json not found: run `dvc repro tokenizer`"):
        LLMTokenizer.load(tmp_path)


@pytest.mark.parametrize("content", [b"garbage", b'{"version": "1.0"}', b"\xff\xfe"])
def test_garbage_tokenizer_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(UserError, match=r"tokenizer.json is not a valid tokenizer .*run `dvc "
                                        r"repro tokenizer`"):
        LLMTokenizer.load(tmp_path)


def test_tokenizer_without_the_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="no special token <\\|endoftext\\|>"):
        LLMTokenizer.load(tmp_path)


def test_loss_mask_equals_its_definition_on_awkward_conversations(tiny_tokenizer):
    """The bisection mask equals "token range inside an assistant span", token by token."""
    from llmcore.data.tokenizer import assistant_spans, mask_from_offsets, render_chat

    replies = ["  leading spaces", "\\n\\nnewlines first", "中文🎉 emoji 👍🏽", "x", "12345",
               "trailing   ", "<|im_end|> typed by a user"]
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
              {"role": "assistant", "content": r}, {"role": "user", "content": r[::-1]},
              {"role": "assistant", "content": r + " again"}] for r in replies]
    for conv in convs:
        enc = tiny_tokenizer.tok.encode(render_chat(conv), add_special_tokens=False)
        spans = assistant_spans(conv)
        expected = [int(any(s <= a < b <= e for s, e in spans)) for a, b in enc.offsets]
        assert mask_from_offsets(enc.offsets, spans) == expected, conv
    assert mask_from_offsets([], [(0, 3)]) == []
    assert mask_from_offsets([(0, 1), (1, 2)], []) == [0, 0]
